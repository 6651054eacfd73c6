"""The SQL history: every event, attempt, dead letter, call state and operator action.

Redis hands records over through a stream (``records``); the ``history`` process writes them
(``writer``); the command line and the console read them (``queries``).
"""
