"""SMTP protocol cores: pure state machines, no I/O."""
