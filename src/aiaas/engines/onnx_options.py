"""How every served ONNX Runtime session is set up: CPU threads, no busy-waiting, quiet logs."""

from __future__ import annotations

import onnxruntime as ort

# ORT's own log lines go straight to stderr, outside our JSON logs (one line that is not JSON
# breaks every log shipper reading them). Its errors reach us as exceptions, which we answer or
# log ourselves, so only a fatal one is printed.
_FATAL_ONLY = 4


def session_options(
    *, threads: int, spin: bool = False, optimise: bool = True
) -> ort.SessionOptions:
    """Options for a session on `threads` intra-op threads (one inter-op thread). `spin`
    lets idle threads busy-wait between runs: faster back-to-back runs, but cores that other
    engines need stay busy."""
    options = ort.SessionOptions()
    if optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = _FATAL_ONLY
    return options
