"""towerflow: workflow-orchestrated auto-retraining for two-tower embedding retrieval."""

__version__ = "0.1.0"
