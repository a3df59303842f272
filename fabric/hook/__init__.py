"""The push hook: a role that turns storage events (S3-compatible webhooks) into published checkpoints.

    app         the HTTP receiver on the shared server edge, and the worker task
    config      the typed hook.toml (rules, token, target, S3 endpoint)
    envelopes   every event envelope shape, parsed into ObjectEvents
    queue       the durable SQLite queue of accepted events and checkpoints
    sns         SNS signature checks and subscription confirmation
    publisher   the worker: from queued events to published checkpoints

The hook publishes to an origin over the wire or straight into a store; it imports
no other role. docs/hooks.md is its reference.
"""
