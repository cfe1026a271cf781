"""Overload handling: admission control in front of the work, and a measure of the event loop's own
lateness so that a busy process never mistakes itself for a dead dependency."""
