"""Data for every host of the ``big_nodes`` group."""

ssh_user = "deploy"
_sudo = True
