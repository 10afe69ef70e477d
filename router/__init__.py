"""Request routing between prefill and decode groups (placeholder, filled by a later issue).

Will hold request admission, group selection policies (load, KV capacity, prefix affinity), the
prefill -> decode request lifecycle, streaming, cancellation and failure handling, and the gRPC
and OpenAI-compatible HTTP front doors with their client. Nothing is implemented here yet; the
server does not exist.
"""
