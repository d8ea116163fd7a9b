"""localnode: a development node agent that runs the pods bound to its Node as local processes.

Like kwok, it is a tool for development and tests, not a kubelet for production: no image is pulled and
containers run with the host's installed packages (the project's virtualenv), each pod in its own network
and UTS namespace on a local bridge. See docs/localnode.md.
"""
