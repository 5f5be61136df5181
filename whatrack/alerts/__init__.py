"""Alert rules over the endpoint's and the queue's metrics, and ``whatrack alerts check``."""

from whatrack.alerts.rules import Result, Rule, Snapshot, default_rules, evaluate

__all__ = ["Result", "Rule", "Snapshot", "default_rules", "evaluate"]
