"""Deploy roles: one small package per concern, each a set of ``@deploy()`` functions.

Each role takes the validated :class:`llamadeploy.config.HostConfig` of the
current host and returns the operations whose change should restart the service.
"""
