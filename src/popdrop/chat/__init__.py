"""Chat orchestration: declarative flows (`flow`), a pure step engine (`engine`), outbound
message types with per-channel degradation (`messages`), and the service that runs a turn
against the domain services in one transaction (`service`)."""
