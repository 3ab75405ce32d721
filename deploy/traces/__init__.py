"""`moemesh trace`: receive, keep and show traces of the mesh with no other software.

records   SpanRecord, TraceStore, the .jsonl format (no OpenTelemetry or gRPC needed)
receiver  an OTLP/gRPC TraceService on the one server bootstrap; ReceiverThread for sync callers
view      waterfall text, PNG timeline, and the `moemesh trace serve|list|show` commands
"""
