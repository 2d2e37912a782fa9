"""Data for every host of the ``cpu_nodes`` group (any inventory in this folder)."""

# connect as an unprivileged deploy user and escalate with sudo
ssh_user = "deploy"
_sudo = True
