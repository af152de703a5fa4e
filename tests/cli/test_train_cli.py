"""`aiaas train` and `aiaas jobs` against the real server, as a user runs them."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from aiaas.cli.follow import Event, JobState, Readout, Update, follow
from tests.conftest import Server, create_org

TERMINAL = {"succeeded", "failed", "cancelled"}


def cli_env(server: Server, key: str) -> dict[str, str]:
    return {**server.env, "AIAAS_BASE_URL": server.base_url, "AIAAS_API_KEY": key}


def run(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiaas", *args],
        env=cli_env(server, key),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make_dataset_version(server: Server, key: str, rows: int = 300) -> str:
    """A small tabular dataset whose label follows column `a`, so a few epochs learn it."""
    lines = ["a,b,colour,label"] + [
        f"{i % 7}.5,{i % 5}.25,{'xyz'[i % 3]},{'ab'[i % 7 > 3]}" for i in range(rows)
    ]
    with server.client(key) as http:
        upload = http.post(
            "/v1/files",
            data={"purpose": "dataset"},
            files={"file": ("table.csv", ("\n".join(lines) + "\n").encode())},
        )
        assert upload.status_code == 200, upload.text
        made = http.post("/v1/datasets", json={"name": "table", "file_ids": [upload.json()["id"]]})
        assert made.status_code == 201, made.text
    return made.json()["version"]["id"]


@contextmanager
def cancelled_at_exit(server: Server, key: str, job_ids: list[str]) -> Iterator[None]:
    """Long jobs must not hold the server's one training slot after a failed assertion."""
    try:
        yield
    finally:
        with server.client(key) as http:
            for job_id in job_ids:
                if http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] not in TERMINAL:
                    http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_train_follows_the_job_to_success_and_prints_model_and_metrics(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    version = make_dataset_version(sqlite_server, org.api_key)

    trained = run(
        sqlite_server, org.api_key, "train", version, "--model", "mlp", "--epochs", "3",
        "--seed", "7", "--suffix", "demo",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    out = trained.stdout
    assert "Epoch 1/3" in out and "Epoch 3/3" in out, out  # each event line, in order
    assert out.index("Epoch 1/3") < out.index("Epoch 3/3")
    assert f"ft:mlp:{org.name}:demo:" in out and "(version 1)" in out, out
    assert "test metrics: accuracy 0." in out, out
    assert "Traceback" not in trained.stderr

    as_json = run(
        sqlite_server, org.api_key, "train", version, "--model", "mlp", "--epochs", "2", "--json"
    )
    assert as_json.returncode == 0, as_json.stderr
    job = json.loads(as_json.stdout)
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft:mlp:")
    assert "Epoch 2/2" in as_json.stderr  # the view goes to stderr, leaving stdout to the JSON


def test_follow_yields_each_event_once_oldest_first_until_the_job_ends(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    version = make_dataset_version(sqlite_server, org.api_key)
    with sqlite_server.client(org.api_key) as http:
        created = http.post(
            "/v1/fine_tuning/jobs",
            json={"model": "mlp", "training_file": version, "hyperparameters": {"n_epochs": 2}},
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]

        updates = list(follow(http, job_id, poll_s=0.1))
        listed = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})

    assert updates[-1].job.status == "succeeded"
    assert all(u.job.status not in TERMINAL for u in updates[:-1])
    followed = [e.id for u in updates for e in u.events]
    assert followed == [e["id"] for e in reversed(listed.json()["data"])]
    readout = Readout()
    for update in updates:
        readout.add(update)
    assert (readout.epoch, readout.n_epochs) == (2, 2)
    assert readout.last is not None and "valid_loss" in readout.last
    assert readout.eta_s(now=0) is None  # a finished job has no ETA


def test_readout_estimates_the_finish_from_epoch_times_without_a_server_estimate() -> None:
    job = JobState.parse(
        {"id": "ftjob-x", "status": "running", "model": "mlp", "estimated_finish": None,
         "progress": {"epoch": 1, "n_epochs": 5, "step": 10}}
    )  # fmt: skip
    epoch_two = Event.parse(
        {"id": "ftevent-2", "created_at": 1, "level": "info", "type": "metrics",
         "message": "Epoch 2/5", "data": {"epoch": 2, "total_epochs": 5, "seconds": 3.0,
                                          "train_loss": 0.5, "valid_loss": 0.25}}
    )  # fmt: skip
    readout = Readout()
    readout.add(Update(job, [epoch_two]))
    assert readout.epoch == 2  # the event is ahead of the job's heartbeat-written progress
    assert readout.eta_s(now=0) == 9.0  # 3 epochs left at 3 s each
    assert readout.metrics_text() == "loss 0.5000  val_loss 0.2500"
    with_estimate = JobState.parse({**job.raw, "estimated_finish": 100})
    readout.add(Update(with_estimate, []))
    assert readout.eta_s(now=40) == 60.0


def test_detached_job_is_listed_shown_interrupted_paused_and_cancelled(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    key = org.api_key
    version = make_dataset_version(sqlite_server, key, rows=1000)
    long_job = ("--model", "mlp", "--epochs", "1000", "--batch-size", "1")  # minutes of work

    detached = run(sqlite_server, key, "train", version, *long_job, "--detach")
    assert detached.returncode == 0, detached.stderr
    running_id, status = detached.stdout.split()
    assert running_id.startswith("ftjob-") and status == "queued"
    with cancelled_at_exit(sqlite_server, key, [running_id]):
        shown = run(sqlite_server, key, "jobs", "show", running_id)
        assert shown.returncode == 0 and running_id in shown.stdout, shown.stderr
        assert "model: mlp -> (not yet trained)" in shown.stdout, shown.stdout
        listed = run(sqlite_server, key, "jobs", "list")
        assert listed.returncode == 0 and running_id in listed.stdout, listed.stderr
        listed_json = json.loads(run(sqlite_server, key, "jobs", "list", "--json").stdout)
        assert [j["id"] for j in listed_json] == [running_id]

        # A second job waits behind the first (one training slot); Ctrl-C stops following it.
        follower = subprocess.Popen(
            [sys.executable, "-m", "aiaas", "train", version, "--model", "mlp"],
            env=cli_env(sqlite_server, key),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([follower.stdout], [], [], 60)
        assert ready, "the follower printed nothing"
        first_line = follower.stdout.readline()  # type: ignore[union-attr]
        assert first_line.startswith("Job ftjob-"), first_line
        queued_id = first_line.split()[1].rstrip(":")
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 130, err
        assert f"`aiaas jobs cancel {queued_id}` stops it" in err and "Traceback" not in err

        with cancelled_at_exit(sqlite_server, key, [queued_id]):
            paused = run(sqlite_server, key, "jobs", "pause", queued_id)
            assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
            resumed = run(sqlite_server, key, "jobs", "resume", queued_id, "--json")
            assert json.loads(resumed.stdout)["status"] == "queued", resumed.stderr
            for job_id in (queued_id, running_id):
                cancelled = run(sqlite_server, key, "jobs", "cancel", job_id)
                assert cancelled.returncode == 0, cancelled.stderr
                assert f"{job_id}  cancelled" in cancelled.stdout, cancelled.stdout

    final = json.loads(run(sqlite_server, key, "jobs", "show", running_id, "--json").stdout)
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None
    events = run(sqlite_server, key, "jobs", "events", running_id, "--limit", "3")
    assert events.returncode == 0 and "cancel" in events.stdout.lower(), events.stdout


def test_bad_request_exits_nonzero_with_the_server_message(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    version = make_dataset_version(sqlite_server, org.api_key)

    bad = run(sqlite_server, org.api_key, "train", version, "--model", "mlp", "--target", "nope")
    assert bad.returncode == 1
    assert "Column 'nope' is not in the dataset" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout

    missing = run(sqlite_server, org.api_key, "jobs", "show", "ftjob-nope")
    assert missing.returncode == 1 and "No fine-tuning job" in missing.stderr
    listed = json.loads(run(sqlite_server, org.api_key, "jobs", "list", "--json").stdout)
    assert listed == []  # the bad request made no job
