"""The lab: a whole oVirt data centre on one machine, for the demo and the tests.

Not shipped to real hosts or engines.
"""
