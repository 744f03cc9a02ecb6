//! `fleet-agent launch`: the supervisor that runs the agent and tries new agent
//! binaries (self-update). Being written; see the module contract in the issue note.
