"""Edge bundles: a registered version as a zip that predicts without aiaas installed."""
