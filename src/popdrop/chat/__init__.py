"""Chat orchestration: declarative flows (`flow`, published in `flow_store`), a pure step
engine (`engine`), outbound message types with per-channel degradation (`messages`), the
turn that runs the engine against the domain services in one transaction (`turn`, with
`conversations`, `facts` and `effects`), where every channel hands a message (`inbound`),
the host side (`host`, `console`, `stats`) and the channels (`web`, `sms`, `telegram`)."""
