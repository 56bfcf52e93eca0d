//! Machine traffic: opens and clicks made by software rather than a person (HEAD probes,
//! image prefetchers, corporate link scanners, chat unfurlers, scripts). They are stored
//! with `metadata.machine = true` and a reason, and move no status or timestamp. ESP
//! parsers use the same detector, so an ESP-reported open is judged like one of our own.
//!
//! The user agent is matched by *product tokens*, not bare substrings: `bot` once matched
//! every Android phone whose model name contains those letters. A User-Agent is split into
//! words (at spaces, `;`, `(`, `)` and `,`); a word's product name is what comes before its
//! `/`. The built-in rules, in order:
//!
//! | rule | matches | example |
//! | --- | --- | --- |
//! | [`PRODUCTS`] | a product name equal to one of them | `curl/8.5.0`, `python-requests/2.31` |
//! | crawler suffix | a product name ending in `bot`, `crawler` or `spider` that carries a version (`Googlebot/2.1`) or a `-` suffix (`Slackbot-LinkExpanding`) | `AhrefsBot/7.0` |
//! | [`VENDORS`] | a vendor's name anywhere (security gateways name themselves in free text) | `Barracuda Sentinel (EE)` |
//!
//! An Android model such as `ROBOT X1 Build/QP1A` carries no version on the word `ROBOT`
//! and is not matched. Operators add their own case-insensitive substrings with
//! `REACHLY_MACHINE_USER_AGENTS` (reason `user_agent:<pattern>`).
//!
//! Apple Mail Privacy Protection (MPP) prefetches every image of a message when it is
//! delivered to an Apple Mail user, through the iCloud Private Relay infrastructure (the
//! same `mask.icloud.com` front ends and egress addresses), with a bare `Mozilla/5.0` user
//! agent. An open from a relay egress address with exactly that user agent is recorded as
//! machine traffic with reason `apple_mpp`: it is a real delivery to an Apple Mail user, so
//! the fact is kept, but it moves no open status. A person's own request through the relay
//! (Safari with Private Relay following a link) carries a full user agent and stays human.
//! The egress ranges are [`RelayRanges`]: a dated list shipped in `data/`, which an
//! operator refreshes from Apple's published `egress-ip-ranges.csv` with
//! `reachly-ingest relay-ranges` (no network at run time).
//!
//! Image proxies that fetch on a person's behalf when the person opens the message
//! (Gmail's `GoogleImageProxy`, Yahoo's `YahooMailProxy`) are *human* opens: they are not
//! machine traffic, but the proxy is recorded (`metadata.proxy`), since a caching proxy
//! hides the person's later opens of the same message.

use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, MatchKind};

/// Product names (lower case) of scripts, HTTP libraries, headless browsers and link
/// unfurlers.
pub const PRODUCTS: &[&str] = &[
    "curl",
    "wget",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "go-http-client",
    "java",
    "okhttp",
    "libwww-perl",
    "apache-httpclient",
    "httpclient",
    "node-fetch",
    "undici",
    "axios",
    "postmanruntime",
    "headlesschrome",
    "phantomjs",
    "facebookexternalhit",
    "whatsapp",
    "skypeuripreview",
    "bingpreview",
    "slurp",
    "linkcheck",
];

/// Vendor names (lower case) of security gateways and scanners that pre-fetch every link or
/// image of a message; matched anywhere in the user agent.
pub const VENDORS: &[&str] = &[
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
    "hornetsecurity",
    "google web preview",
];

/// Suffixes of crawler product names.
const CRAWLER_SUFFIXES: &[&str] = &["bot", "crawler", "spider"];

/// Image proxies that fetch when a person opens the message: `(marker in the user agent,
/// name recorded in metadata.proxy)`.
pub const HUMAN_PROXIES: &[(&str, &str)] =
    &[("googleimageproxy", "gmail"), ("yahoomailproxy", "yahoo")];

/// The relay egress list shipped with the service (Apple's format: `prefix,country,region,city,`;
/// `#` lines are comments and carry the date of the list).
pub const BUILTIN_RELAY_RANGES: &str = include_str!("../data/apple-relay-egress.csv");

/// The user agent of an MPP prefetch.
const MPP_USER_AGENT: &str = "Mozilla/5.0";

/// A set of IP networks, looked up by binary search over merged, sorted ranges (Apple's list
/// has hundreds of thousands of prefixes; a lookup is a few dozen comparisons).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRanges {
    /// Inclusive `(first, last)` address ranges, IPv4 mapped into IPv6 space, sorted and
    /// merged.
    ranges: Vec<(u128, u128)>,
    /// The list's date, from a `# date: YYYY-MM-DD` comment line.
    pub date: Option<String>,
}

impl RelayRanges {
    /// Parses Apple's CSV format (or our dated copy of it). A line that is neither blank, a
    /// comment nor `prefix,...` with a valid CIDR prefix is an error naming the line.
    pub fn parse(text: &str) -> Result<RelayRanges, String> {
        let mut ranges = Vec::new();
        let mut date = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                if let Some(d) = comment.trim().strip_prefix("date:") {
                    date = Some(d.trim().to_owned());
                }
                continue;
            }
            let prefix = line.split(',').next().unwrap_or("").trim();
            let net: ipnet::IpNet = prefix
                .parse()
                .or_else(|_| prefix.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("line {}: {prefix:?} is not an IP prefix", n + 1))?;
            ranges.push((as_u128(net.network()), as_u128(net.broadcast())));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(RelayRanges {
            ranges: merged,
            date,
        })
    }

    /// The list shipped with the service.
    pub fn builtin() -> RelayRanges {
        RelayRanges::parse(BUILTIN_RELAY_RANGES).unwrap_or_default()
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let x = as_u128(ip);
        let i = self.ranges.partition_point(|(lo, _)| *lo <= x);
        i > 0 && self.ranges[i - 1].1 >= x
    }

    /// Merged ranges held.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Our dated file: a header, then one merged range per line as CIDR prefixes.
    pub fn to_file(&self, date: &str, source: &str) -> String {
        let mut out = format!(
            "# Apple iCloud Private Relay egress ranges (merged), used to tell Apple Mail Privacy\n\
             # Protection prefetches from people. Refresh: reachly-ingest relay-ranges <egress-ip-ranges.csv>\n\
             # source: {source}\n# date: {date}\n"
        );
        for (lo, hi) in &self.ranges {
            for net in ipnet::IpNet::aggregate(&range_to_nets(*lo, *hi)) {
                out.push_str(&format!("{net}\n"));
            }
        }
        out
    }
}

/// An address as a number in IPv6 space (IPv4 as IPv4-mapped), so one sorted list holds both.
fn as_u128(ip: std::net::IpAddr) -> u128 {
    match ip {
        std::net::IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6),
        },
    }
}

/// The CIDR networks covering `[lo, hi]` exactly.
fn range_to_nets(lo: u128, hi: u128) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    let mut start = lo;
    loop {
        // The largest block aligned at `start` that does not pass `hi`.
        let mut size = if start == 0 {
            128
        } else {
            start.trailing_zeros()
        };
        while size > 0
            && start
                .checked_add((1u128 << size) - 1)
                .is_none_or(|end| end > hi)
        {
            size -= 1;
        }
        let v6 = std::net::Ipv6Addr::from(start);
        let net = match v6.to_ipv4_mapped() {
            Some(v4) if size <= 32 => ipnet::IpNet::new(v4.into(), 32 - size as u8),
            _ => ipnet::IpNet::new(v6.into(), 128 - size as u8),
        };
        if let Ok(n) = net {
            nets.push(n);
        }
        let end = start + ((1u128 << size) - 1);
        if end >= hi {
            return nets;
        }
        start = end + 1;
    }
}

#[derive(Debug, Clone, Default)]
pub struct MachineDetector {
    /// The operator's extra substrings (lower case).
    extra: Vec<String>,
    /// Apple's relay egress ranges (MPP prefetches).
    relay: std::sync::Arc<RelayRanges>,
}

impl MachineDetector {
    /// The built-in rules plus the operator's extra substrings.
    pub fn new(extra: &[String]) -> MachineDetector {
        MachineDetector {
            extra: extra
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty())
                .collect(),
            relay: std::sync::Arc::new(RelayRanges::builtin()),
        }
    }

    /// The same detector with another relay egress list (the operator's refreshed file).
    pub fn with_relay_ranges(mut self, relay: RelayRanges) -> MachineDetector {
        self.relay = std::sync::Arc::new(relay);
        self
    }

    /// [`classify`](Self::classify) for an open pixel, which also knows the client's full
    /// address: an MPP prefetch is `apple_mpp`.
    pub fn classify_open(
        &self,
        is_head: bool,
        user_agent: Option<&str>,
        client: std::net::IpAddr,
    ) -> Option<String> {
        if !is_head
            && user_agent.map(str::trim) == Some(MPP_USER_AGENT)
            && self.relay.contains(client)
        {
            return Some("apple_mpp".into());
        }
        self.classify(is_head, user_agent)
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
        if let Some(p) = self.extra.iter().find(|p| ua.contains(p.as_str())) {
            return Some(format!("user_agent:{p}"));
        }
        builtin_match(&ua).map(|name| format!("user_agent:{name}"))
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

/// The image proxy a person's open came through, if it is one of [`HUMAN_PROXIES`].
/// The markers are ASCII, so one case-insensitive Aho-Corasick pass finds them in place,
/// without a lower-case copy of the user agent (this runs on every human open).
pub fn human_proxy(user_agent: Option<&str>) -> Option<&'static str> {
    static PROXY_FINDER: LazyLock<AhoCorasick> = LazyLock::new(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .build(HUMAN_PROXIES.iter().map(|(marker, _)| marker))
            .expect("HUMAN_PROXIES are a valid pattern set")
    });
    first_listed(&PROXY_FINDER, user_agent?).map(|i| HUMAN_PROXIES[i].1)
}

/// The index of the first pattern, in list order, that occurs anywhere in `haystack`: one
/// pass of `finder` (built with [`MatchKind::Standard`], which overlapping search needs).
fn first_listed(finder: &AhoCorasick, haystack: &str) -> Option<usize> {
    finder
        .find_overlapping_iter(haystack)
        .map(|m| m.pattern().as_usize())
        .min()
}

/// The built-in rule a lower-case user agent matches: the product or vendor name.
fn builtin_match(ua: &str) -> Option<String> {
    for word in ua
        .split([' ', ';', '(', ')', ','])
        .filter(|w| !w.is_empty())
    {
        let (name, versioned) = match word.split_once('/') {
            Some((name, _)) => (name, true),
            None => (word, false),
        };
        if PRODUCTS.contains(&name) {
            return Some(name.to_owned());
        }
        let (stem, dashed) = match name.split_once('-') {
            Some((stem, _)) => (stem, true),
            None => (name, false),
        };
        if (versioned || dashed)
            && CRAWLER_SUFFIXES
                .iter()
                .any(|s| stem.ends_with(s) && stem.len() >= s.len())
        {
            return Some(stem.to_owned());
        }
    }
    first_vendor(ua).map(str::to_owned)
}

/// The first of [`VENDORS`], in list order, that occurs anywhere in `ua` (lower case): one
/// pass of an Aho-Corasick automaton over all the names, built once.
fn first_vendor(ua: &str) -> Option<&'static str> {
    static VENDOR_FINDER: LazyLock<AhoCorasick> = LazyLock::new(|| {
        AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(VENDORS)
            .expect("VENDORS are a valid pattern set")
    });
    first_listed(&VENDOR_FINDER, ua).map(|i| VENDORS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vendor_is_the_first_of_the_list_found_anywhere_in_the_user_agent() {
        // Every vendor alone, in any position, and the list's order when two occur.
        for v in VENDORS {
            assert_eq!(first_vendor(&format!("x {v} y")), Some(*v), "{v}");
            assert_eq!(first_vendor(v), Some(*v), "{v}");
        }
        assert_eq!(
            first_vendor("sophos relayed by barracuda"),
            Some("barracuda")
        );
        assert_eq!(first_vendor("mimecast via trend micro"), Some("mimecast"));
        assert_eq!(
            first_vendor("mozilla/5.0 (windows nt 10.0) chrome/126.0"),
            None
        );
    }

    /// Real user agents of real mail clients and browsers: none may be flagged.
    const PEOPLE: &[&str] = &[
        // Apple Mail, macOS and iOS (no product token of their own).
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
        "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
        // Outlook for Windows (Word renders the HTML) and new Outlook (WebView2).
        "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
        "Mozilla/5.0 (Windows NT 10.0; WOW64; Trident/7.0; .NET4.0C; .NET4.0E; Microsoft Outlook 16.0.5422; ms-office; MSOffice 16)",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
        // Gmail app on Android (WebView) and Samsung Email.
        "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/UD1A.231105.004; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.193 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 13; SM-S911B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36",
        // Android phones whose model names contain "bot", which the old substring list flagged.
        "Mozilla/5.0 (Linux; Android 10; ROBOT X1 Build/QP1A.190711.020; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/118.0.5993.111 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 12; Cubot KingKong 7 Build/SP1A.210812.016) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36",
        // Thunderbird, Yahoo Mail app, and desktop browsers (webmail).
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0",
        "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
        "Mozilla/5.0 (Linux; Android 13; moto g stylus 5G Build/T1TGS33.93; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 YahooMobile/1.0 (mail; 7.38.0)",
        // Image proxies that fetch for a person (human opens, recorded as proxies).
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
    ];

    /// Software, each with the rule it must be caught by.
    const MACHINES: &[(&str, &str)] = &[
        ("curl/8.5.0", "curl"),
        ("python-requests/2.31.0", "python-requests"),
        ("Go-http-client/1.1", "go-http-client"),
        ("Java/17.0.2", "java"),
        (
            "Apache-HttpClient/4.5.14 (Java/17.0.2)",
            "apache-httpclient",
        ),
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "googlebot",
        ),
        (
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "bingbot",
        ),
        (
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
            "slackbot",
        ),
        ("Twitterbot/1.0", "twitterbot"),
        (
            "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
            "facebookexternalhit",
        ),
        ("WhatsApp/2.23.20.0 A", "whatsapp"),
        (
            "Mozilla/5.0 (Windows NT 6.1; WOW64) SkypeUriPreview Preview/0.5",
            "skypeuripreview",
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.71 Safari/537.36",
            "headlesschrome",
        ),
        (
            "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))",
            "barracuda",
        ),
        ("Mimecast/1.0 URL Protect", "mimecast"),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/91.0 Safari/537.36 Proofpoint",
            "proofpoint",
        ),
        (
            "Microsoft Office Protocol Discovery",
            "microsoft office protocol discovery",
        ),
        ("AhrefsBot/7.0 (+http://ahrefs.com/robot/)", "ahrefsbot"),
    ];

    #[test]
    fn real_mail_clients_are_people() {
        let d = MachineDetector::default();
        for ua in PEOPLE {
            assert_eq!(d.classify(false, Some(ua)), None, "flagged a person: {ua}");
        }
    }

    #[test]
    fn scripts_crawlers_unfurlers_and_gateways_are_machines_with_their_rule() {
        let d = MachineDetector::default();
        for (ua, rule) in MACHINES {
            assert_eq!(
                d.classify(false, Some(ua)).as_deref(),
                Some(format!("user_agent:{rule}").as_str()),
                "{ua}"
            );
        }
    }

    #[test]
    fn head_requests_missing_agents_and_operator_patterns() {
        let d = MachineDetector::new(&[" AcmeScanner ".into(), "".into()]);
        assert_eq!(
            d.classify(true, Some("Mozilla/5.0")).as_deref(),
            Some("head_request")
        );
        assert_eq!(d.classify(false, None).as_deref(), Some("no_user_agent"));
        assert_eq!(
            d.classify(false, Some("  ")).as_deref(),
            Some("no_user_agent")
        );
        assert_eq!(
            d.classify(false, Some("acmescanner/1.0")).as_deref(),
            Some("user_agent:acmescanner")
        );
        assert_eq!(d.classify_reported(None), None);
        assert_eq!(
            d.classify_reported(Some("curl/8")).as_deref(),
            Some("user_agent:curl")
        );
    }

    #[test]
    fn relay_ranges_merge_look_up_and_round_trip() {
        let r = RelayRanges::parse(
            "# date: 2026-11-01\n17.0.0.0/8,US,US-CA,Cupertino,\n104.28.0.0/24,DE,DE-BE,Berlin,\n104.28.1.0/24,DE,,,\n2a02:26f7:b3c0:4000::/64,GB,,,\n\n",
        )
        .unwrap();
        assert_eq!(r.date.as_deref(), Some("2026-11-01"));
        assert_eq!(r.len(), 3, "adjacent /24s merge");
        for ip in [
            "17.1.2.3",
            "104.28.1.255",
            "2a02:26f7:b3c0:4000::9",
            "::ffff:17.0.0.1",
        ] {
            assert!(r.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "16.255.255.255",
            "104.28.2.0",
            "2a02:26f7:b3c0:4001::1",
            "18.0.0.0",
        ] {
            assert!(!r.contains(ip.parse().unwrap()), "{ip}");
        }
        let file = r.to_file("2026-11-30", "test");
        let again = RelayRanges::parse(&file).unwrap();
        assert_eq!(again.ranges, r.ranges);
        assert!(file.contains("104.28.0.0/23"), "{file}");
        assert!(
            RelayRanges::parse("not-an-ip,US")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(!RelayRanges::builtin().is_empty());
    }

    #[test]
    fn an_mpp_prefetch_is_machine_and_a_person_through_the_relay_is_not() {
        let d = MachineDetector::default()
            .with_relay_ranges(RelayRanges::parse("172.225.0.0/16,US,,,").unwrap());
        let relay: std::net::IpAddr = "172.225.9.9".parse().unwrap();
        let home: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            d.classify_open(false, Some("Mozilla/5.0"), relay)
                .as_deref(),
            Some("apple_mpp")
        );
        assert_eq!(d.classify_open(false, Some("Mozilla/5.0"), home), None);
        let safari = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148";
        assert_eq!(d.classify_open(false, Some(safari), relay), None);
        assert_eq!(
            d.classify_open(true, Some("Mozilla/5.0"), relay).as_deref(),
            Some("head_request")
        );
    }

    #[test]
    fn image_proxies_of_people_are_named() {
        assert_eq!(
            human_proxy(Some(
                "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
            )),
            Some("gmail")
        );
        assert_eq!(
            human_proxy(Some("YahooMailProxy; https://help.yahoo.com/kb/")),
            Some("yahoo")
        );
        assert_eq!(human_proxy(Some("x GOOGLEIMAGEPROXY")), Some("gmail"));
        assert_eq!(human_proxy(Some("Mozilla/5.0")), None);
        assert_eq!(human_proxy(Some("")), None);
        assert_eq!(human_proxy(None), None);
    }
}
