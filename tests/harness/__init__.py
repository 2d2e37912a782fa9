"""Throwaway test hosts: real systemd Debian machines booted with systemd-nspawn."""
