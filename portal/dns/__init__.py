"""DNS for the appliance: expected records, export, checks against the
authoritative servers, and RFC 2136 updates (see DESIGN.md: pure builders
first, side effects only in agent operations)."""
