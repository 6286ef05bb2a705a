"""Mounting: `commands` (the `mount` and `umount` commands and their checks, with neither
pyfuse3 nor trio), `daemon` (the trio daemon that serves a mount), `service` (logging for the
journal and systemd's readiness notification)."""
