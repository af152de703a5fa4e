"""The LLM engine: llama.cpp through llama-cpp-python's low-level API, continuous batching."""
