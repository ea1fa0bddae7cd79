//! The line protocol of the `impair` binary: a script starts `impair link` or
//! `impair balancer`, waits for its one JSON ready line, then may write commands on its
//! stdin and read one JSON reply line per command. Parsing and applying commands lives here
//! so the binary only wires stdin and signals.
//!
//! Link: `set SPEC` (both directions), `set a2b SPEC`, `set b2a SPEC`, `rebind [ADDRESS]`,
//! `counters`. Balancer: `up N`, `down N` (blackholed), `refuse N`,
//! `health skip-down|ignore`, `counters`. A reply is `{"ok":true,...}` or
//! `{"error":"..."}`.

use serde_json::{Value, json};

use super::{BackendState, Balancer, Direction, HealthMode, Impairment, Link};

/// Applies one command line to `link`.
pub fn link_command(link: &Link, line: &str) -> Value {
    let mut words = line.split_whitespace();
    let result = match words.next() {
        Some("set") => {
            let rest: Vec<&str> = words.collect();
            let (directions, spec) = match rest.as_slice() {
                ["a2b", spec @ ..] => (vec![Direction::AtoB], spec.join(" ")),
                ["b2a", spec @ ..] => (vec![Direction::BtoA], spec.join(" ")),
                spec => (Direction::BOTH.to_vec(), spec.join(" ")),
            };
            spec.parse::<Impairment>().map(|profile| {
                for direction in directions {
                    link.set_direction(direction, profile.clone());
                }
                link_state(link)
            })
        }
        Some("rebind") => match words.next().map(str::parse) {
            None => Ok(None),
            Some(Ok(address)) => Ok(Some(address)),
            Some(Err(_)) => Err(format!("`{line}`: expected rebind [IPV4 ADDRESS]")),
        }
        .map(|address| {
            link.rebind_udp(address);
            json!({})
        }),
        Some("counters") => Ok(json!({
            "a_to_b": link.counters(Direction::AtoB),
            "b_to_a": link.counters(Direction::BtoA),
        })),
        _ => Err(format!("unknown command `{line}` (set, rebind, counters)")),
    };
    reply(result)
}

/// Both directions' impairment, as specs.
pub fn link_state(link: &Link) -> Value {
    json!({
        "a_to_b": link.impairment(Direction::AtoB).to_string(),
        "b_to_a": link.impairment(Direction::BtoA).to_string(),
    })
}

/// Applies one command line to `balancer`.
pub fn balancer_command(balancer: &Balancer, backends: usize, line: &str) -> Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    let backend = |word: &str| {
        word.parse::<usize>()
            .ok()
            .filter(|index| *index < backends)
            .ok_or_else(|| format!("`{word}`: expected a backend index below {backends}"))
    };
    let result = match words.as_slice() {
        [verb @ ("up" | "down" | "refuse"), index] => backend(index).map(|index| {
            let state = match *verb {
                "up" => BackendState::Up,
                "down" => BackendState::Blackholed,
                _ => BackendState::Refusing,
            };
            balancer.set_state(index, state);
            json!({})
        }),
        ["health", mode] => match *mode {
            "skip-down" => Ok(HealthMode::SkipDown),
            "ignore" => Ok(HealthMode::Ignore),
            other => Err(format!("`{other}`: expected skip-down or ignore")),
        }
        .map(|mode| {
            balancer.set_health_mode(mode);
            json!({})
        }),
        ["counters"] => Ok(json!({
            "backends": (0..backends).map(|i| balancer.counters(i)).collect::<Vec<_>>(),
        })),
        _ => Err(format!(
            "unknown command `{line}` (up N, down N, refuse N, health MODE, counters)"
        )),
    };
    reply(result)
}

fn reply(result: Result<Value, String>) -> Value {
    match result {
        Ok(mut value) => {
            value["ok"] = json!(true);
            value
        }
        Err(error) => json!({ "error": error }),
    }
}
