"""The embeddings engine: sentence encoders exported once to ONNX and served by ONNX Runtime.

`export` turns a sentence-transformers folder into cached fp32 and int8 ONNX files; `encoder`
runs them (tokenise, forward, pool, normalise). Batching across requests is
`aiaas.scheduling.batcher.DynamicBatcher`, shared with the classic engine.
"""
