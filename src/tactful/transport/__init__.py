"""The gRPC transport: converts messages, calls the core, maps errors. No decisions here."""
