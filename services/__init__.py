"""The gRPC side of the mesh: the router and expert-host servicers (thin: decode, call the core,
encode), the one server bootstrap (health, reflection, limits, graceful stop), error mapping and
telemetry interceptors, transports from the router to expert hosts, and `launch.py`, which builds
a router or an expert host from a typed config. Imports the pure cores; never ray."""
