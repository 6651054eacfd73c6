"""Operator tools on top of the core and the processes: the ``rilla-bridge`` command line
(``ops.cli``), the local run (``ops.localrun``) and its demo calls (``ops.demo``)."""
