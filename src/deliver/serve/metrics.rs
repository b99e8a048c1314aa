//! Counters for `/metrics` (Prometheus text exposition format 0.0.4) and the exit summary.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A set of labelled counters and gauges; output sorted by name and labels.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(&'static str, String), f64>>,
}

/// `(name, help, type)` of every metric kiln exposes.
const META: &[(&str, &str, &str)] = &[
    (
        "kiln_dhcp_ignored_total",
        "DHCP packets not answered, by reason.",
        "counter",
    ),
    (
        "kiln_dhcp_replies_total",
        "DHCP replies sent, by message type and client architecture.",
        "counter",
    ),
    (
        "kiln_dhcp_requests_total",
        "DHCP packets received from PXE clients, by message type and architecture.",
        "counter",
    ),
    (
        "kiln_http_bytes_sent_total",
        "HTTP body bytes sent, by route.",
        "counter",
    ),
    (
        "kiln_http_connections_refused_total",
        "HTTP connections closed at once, by reason (server or per-client cap, no descriptors).",
        "counter",
    ),
    ("kiln_http_in_flight", "HTTP responses being sent.", "gauge"),
    (
        "kiln_http_requests_total",
        "HTTP requests answered, by route and status code.",
        "counter",
    ),
    (
        "kiln_integrity_failures_total",
        "Served files found changed on disk since they were verified (responses cut).",
        "counter",
    ),
    (
        "kiln_served_builds",
        "Verified role builds being served.",
        "gauge",
    ),
    (
        "kiln_served_nodes",
        "Inventory nodes that can boot.",
        "gauge",
    ),
    (
        "kiln_tftp_bytes_sent_total",
        "TFTP data bytes sent (first transmissions and retransmissions).",
        "counter",
    ),
    (
        "kiln_tftp_in_flight",
        "TFTP transfers running.",
        "gauge",
    ),
    (
        "kiln_tftp_retransmits_total",
        "TFTP blocks sent again after a timeout or a lost-block ACK.",
        "counter",
    ),
    (
        "kiln_tftp_transfers_total",
        "TFTP transfers, by result.",
        "counter",
    ),
    (
        "kiln_tftp_unknown_tid_total",
        "TFTP packets from an address or port that is no transfer's client (answered with error 5).",
        "counter",
    ),
];

impl Metrics {
    /// Adds `v` to the counter `name{labels}`.
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        let mut m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((name, render_labels(labels))).or_insert(0.0) += v;
    }

    /// Increments the counter `name{labels}`.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1.0);
    }

    /// Sets the gauge `name{labels}`.
    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        let mut m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        m.insert((name, render_labels(labels)), v);
    }

    /// Sum of every series of `name`.
    pub fn total(&self, name: &str) -> f64 {
        let m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum of every series of the counter `name`, as the integer it counts (0 when it has no
    /// series: an empty float sum is -0.0).
    pub fn count(&self, name: &str) -> u64 {
        let t = self.total(name);
        if t.is_finite() && t > 0.0 {
            t.round() as u64
        } else {
            0
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, help, ty) in META {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
            let mut any = false;
            for ((n, labels), v) in m.iter() {
                if n == name {
                    any = true;
                    let _ = writeln!(out, "{name}{labels} {v}");
                }
            }
            if !any && *ty == "gauge" {
                let _ = writeln!(out, "{name} 0");
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let body: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_escaped_series() {
        let m = Metrics::default();
        m.inc(
            "kiln_http_requests_total",
            &[("route", "role_file"), ("code", "200")],
        );
        m.inc(
            "kiln_http_requests_total",
            &[("route", "role_file"), ("code", "200")],
        );
        m.add("kiln_http_bytes_sent_total", &[("route", "a\"b")], 10.0);
        let t = m.render();
        assert!(t.contains("kiln_http_requests_total{route=\"role_file\",code=\"200\"} 2\n"));
        assert!(t.contains("kiln_http_bytes_sent_total{route=\"a\\\"b\"} 10\n"));
        assert!(t.contains("# TYPE kiln_http_in_flight gauge\nkiln_http_in_flight 0\n"));
        assert_eq!(m.total("kiln_http_requests_total"), 2.0);
        assert_eq!(m.count("kiln_http_requests_total"), 2);
        assert_eq!(m.count("kiln_tftp_transfers_total"), 0);
        assert_eq!(
            serde_json::json!(m.count("kiln_tftp_transfers_total")).to_string(),
            "0"
        );
    }
}
