"""The offline stand-ins for everything whatrack talks to in cloud mode (DESIGN.md §4); start them with
:class:`whatrack.devstack.stack.Stack` or ``whatrack stack up``."""
