"""Job workers: the runner that claims queued jobs and the executors that run them."""
