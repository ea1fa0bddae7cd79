//! Upstream side of an exported service: pooled HTTP clients, load balancing, health checks, circuit breaking, retries.
