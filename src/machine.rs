//! Machine traffic: opens and clicks made by software rather than a person (HEAD probes,
//! image prefetchers, corporate link scanners, chat unfurlers, scripts). They are stored
//! with `metadata.machine = true` and a reason, and move no status or timestamp. The
//! built-in list is matched case-insensitively as substrings of the User-Agent; operators
//! add their own with `REACHLY_MACHINE_USER_AGENTS`. ESP parsers use the same detector, so
//! an ESP-reported open is judged like one of our own.

/// Built-in user-agent substrings (lower case) of known prefetchers and scanners.
pub const BUILTIN_PATTERNS: &[&str] = &[
    // Security gateways that pre-fetch every link or image of a message.
    "barracuda",
    "mimecast",
    "proofpoint",
    "messagelabs",
    "symantec",
    "forcepoint",
    "trendmicro",
    "trend micro",
    "sophos",
    "fireeye",
    "ironport",
    "zscaler",
    "safelinks",
    "microsoft office protocol discovery",
    "bitdefender",
    "kaspersky",
    "avast",
    "hornetsecurity",
    // Link unfurlers and crawlers.
    "bot",
    "crawler",
    "spider",
    "slurp",
    "facebookexternalhit",
    "whatsapp",
    "skypeuripreview",
    "preview",
    "headlesschrome",
    "phantomjs",
    // Scripts and HTTP libraries.
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww-perl",
    "httpclient",
    "node-fetch",
    "axios/",
    "postmanruntime",
];

#[derive(Debug, Clone)]
pub struct MachineDetector {
    patterns: Vec<String>,
}

impl Default for MachineDetector {
    fn default() -> Self {
        MachineDetector::new(&[])
    }
}

impl MachineDetector {
    /// The built-in list plus the operator's extra patterns.
    pub fn new(extra: &[String]) -> MachineDetector {
        let mut patterns: Vec<String> = BUILTIN_PATTERNS.iter().map(|p| p.to_string()).collect();
        patterns.extend(
            extra
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty()),
        );
        MachineDetector { patterns }
    }

    /// `Some(reason)` when the request looks like software.
    pub fn classify(&self, is_head: bool, user_agent: Option<&str>) -> Option<String> {
        if is_head {
            return Some("head_request".into());
        }
        let ua = match user_agent.map(str::trim) {
            None | Some("") => return Some("no_user_agent".into()),
            Some(ua) => ua.to_lowercase(),
        };
        self.patterns
            .iter()
            .find(|p| ua.contains(p.as_str()))
            .map(|p| format!("user_agent:{p}"))
    }

    /// Like [`classify`](Self::classify) for an ESP-reported event, where a missing user
    /// agent says nothing (many ESPs leave it out).
    pub fn classify_reported(&self, user_agent: Option<&str>) -> Option<String> {
        match user_agent.map(str::trim) {
            None | Some("") => None,
            ua => self.classify(false, ua),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_requests_scanners_and_scripts_are_machines_and_browsers_are_not() {
        let d = MachineDetector::new(&["AcmeScanner".into()]);
        assert_eq!(
            d.classify(true, Some("Mozilla/5.0")).as_deref(),
            Some("head_request")
        );
        assert_eq!(d.classify(false, None).as_deref(), Some("no_user_agent"));
        assert!(
            d.classify(false, Some("Mozilla/5.0 (compatible; Barracuda Sentinel)"))
                .is_some()
        );
        assert!(d.classify(false, Some("curl/8.5.0")).is_some());
        assert_eq!(
            d.classify(false, Some("acmescanner/1.0")).as_deref(),
            Some("user_agent:acmescanner")
        );
        let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";
        assert_eq!(d.classify(false, Some(chrome)), None);
        assert_eq!(d.classify_reported(None), None);
    }
}
