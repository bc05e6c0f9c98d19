"""Local stand-ins for the outside world: a rotating CA and the GCE guest agent's credential writer."""
