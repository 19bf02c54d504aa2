"""The control plane: the App (lifecycle), the Scaler (the replica set and its ScaleReports), the
autoscaler loop and its pure policy, and the consumer of HTTP scaling requests. The only plane that
creates actors."""
