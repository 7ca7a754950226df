"""popdrop: micro-events with chat as the control plane."""

__version__ = "0.1.0"
