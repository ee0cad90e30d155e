use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_credential_types::provider::future;
use aws_types::region::Region;
use aws_types::service_config::LoadServiceConfig;
use proptest::prelude::*;

use super::*;

/// A DescribeInstances answer shaped like EC2's (the API reference example, trimmed):
/// two reservations, three instances, nested `item`s in network interfaces and block
/// devices, tags, and a `nextToken`.
const DESCRIBE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
    <reservationSet>
        <item>
            <reservationId>r-1234567890abcdef0</reservationId>
            <ownerId>123456789012</ownerId>
            <groupSet/>
            <instancesSet>
                <item>
                    <instanceId>i-1234567890abcdef0</instanceId>
                    <imageId>ami-bff32ccc</imageId>
                    <instanceState>
                        <code>16</code>
                        <name>running</name>
                    </instanceState>
                    <privateDnsName>ip-192-168-1-88.eu-west-1.compute.internal</privateDnsName>
                    <dnsName>ec2-54-194-252-215.eu-west-1.compute.amazonaws.com</dnsName>
                    <reason/>
                    <keyName>my_keypair</keyName>
                    <amiLaunchIndex>0</amiLaunchIndex>
                    <productCodes/>
                    <instanceType>t2.micro</instanceType>
                    <launchTime>2018-05-08T16:46:19.000Z</launchTime>
                    <placement>
                        <availabilityZone>eu-west-1c</availabilityZone>
                        <groupName/>
                        <tenancy>default</tenancy>
                    </placement>
                    <monitoring>
                        <state>disabled</state>
                    </monitoring>
                    <subnetId>subnet-56f5f633</subnetId>
                    <vpcId>vpc-11112222</vpcId>
                    <privateIpAddress>192.168.1.88</privateIpAddress>
                    <ipAddress>54.194.252.215</ipAddress>
                    <sourceDestCheck>true</sourceDestCheck>
                    <groupSet>
                        <item>
                            <groupId>sg-e4076980</groupId>
                            <groupName>SecurityGroup1</groupName>
                        </item>
                    </groupSet>
                    <architecture>x86_64</architecture>
                    <rootDeviceType>ebs</rootDeviceType>
                    <rootDeviceName>/dev/xvda</rootDeviceName>
                    <blockDeviceMapping>
                        <item>
                            <deviceName>/dev/xvda</deviceName>
                            <ebs>
                                <volumeId>vol-1234567890abcdef0</volumeId>
                                <status>attached</status>
                                <attachTime>2015-12-22T10:44:09.000Z</attachTime>
                                <deleteOnTermination>true</deleteOnTermination>
                            </ebs>
                        </item>
                    </blockDeviceMapping>
                    <virtualizationType>hvm</virtualizationType>
                    <clientToken>xMcwG14507example</clientToken>
                    <tagSet>
                        <item>
                            <key>Name</key>
                            <value>bastion</value>
                        </item>
                        <item>
                            <key>env</key>
                            <value>prod &amp; shared</value>
                        </item>
                        <item>
                            <key>empty</key>
                            <value/>
                        </item>
                    </tagSet>
                    <hypervisor>xen</hypervisor>
                    <networkInterfaceSet>
                        <item>
                            <networkInterfaceId>eni-551ba033</networkInterfaceId>
                            <subnetId>subnet-56f5f633</subnetId>
                            <attachment>
                                <attachmentId>eni-attach-39697adc</attachmentId>
                                <deviceIndex>0</deviceIndex>
                                <status>attached</status>
                            </attachment>
                            <privateIpAddressesSet>
                                <item>
                                    <privateIpAddress>192.168.1.88</privateIpAddress>
                                    <primary>true</primary>
                                </item>
                            </privateIpAddressesSet>
                            <tagSet>
                                <item><key>Name</key><value>not-the-instance-tag</value></item>
                            </tagSet>
                        </item>
                    </networkInterfaceSet>
                    <ebsOptimized>false</ebsOptimized>
                </item>
                <item>
                    <instanceId>i-0598c7d356eba48d7</instanceId>
                    <instanceState><code>80</code><name>stopped</name></instanceState>
                    <instanceType>t3.micro</instanceType>
                    <launchTime>2018-05-09T10:00:00Z</launchTime>
                </item>
            </instancesSet>
        </item>
        <item>
            <reservationId>r-0000000000000000a</reservationId>
            <instancesSet>
                <item>
                    <instanceId>i-0aaaaaaaaaaaaaaaa</instanceId>
                    <instanceState><code>16</code><name>running</name></instanceState>
                    <tagSet><item><key>Name</key><value>bastion</value></item></tagSet>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
    <nextToken>eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9</nextToken>
</DescribeInstancesResponse>"#;

fn at(text: &str) -> SystemTime {
    SystemTime::try_from(DateTime::from_str(text, Format::DateTime).unwrap()).unwrap()
}

#[test]
fn describe_instances_nesting_tags_and_next_token() {
    let root = interpret_response("DescribeInstances", 200, DESCRIBE.as_bytes()).unwrap();
    let page = parse_describe_instances(&root).unwrap();
    assert_eq!(
        page.next_token.as_deref(),
        Some("eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9")
    );
    let ids: Vec<_> = page.instances.iter().map(|i| i.id.as_str()).collect();
    // Instances only: not the ids of volumes, interfaces or attachments nested inside.
    assert_eq!(
        ids,
        [
            "i-1234567890abcdef0",
            "i-0598c7d356eba48d7",
            "i-0aaaaaaaaaaaaaaaa"
        ]
    );
    let first = &page.instances[0];
    assert_eq!(first.state, "running");
    assert_eq!(first.instance_type.as_deref(), Some("t2.micro"));
    assert_eq!(first.private_ip.as_deref(), Some("192.168.1.88"));
    assert_eq!(first.availability_zone.as_deref(), Some("eu-west-1c"));
    assert_eq!(first.launch_time, Some(at("2018-05-08T16:46:19Z")));
    assert_eq!(first.launch_time_text(), "2018-05-08T16:46:19Z");
    // The instance's own tagSet, not the network interface's; entities resolved.
    assert_eq!(
        first.tags,
        BTreeMap::from([
            ("Name".to_owned(), "bastion".to_owned()),
            ("empty".to_owned(), String::new()),
            ("env".to_owned(), "prod & shared".to_owned()),
        ])
    );
    assert_eq!(page.instances[1].state, "stopped");
    assert!(page.instances[1].tags.is_empty());
    assert_eq!(page.instances[2].launch_time, None);
    assert_eq!(page.instances[2].launch_time_text(), "unknown");
}

#[test]
fn empty_result_and_last_page() {
    for xml in [
        r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
            <requestId>1</requestId><reservationSet/></DescribeInstancesResponse>"#,
        r#"<DescribeInstancesResponse><requestId>1</requestId>
            <reservationSet></reservationSet><nextToken/></DescribeInstancesResponse>"#,
        "<DescribeInstancesResponse/>",
    ] {
        let root = interpret_response("DescribeInstances", 200, xml.as_bytes()).unwrap();
        let page = parse_describe_instances(&root).unwrap();
        assert!(page.instances.is_empty(), "{xml}");
        assert_eq!(page.next_token, None, "{xml}");
    }
}

#[test]
fn an_instance_without_id_or_state_is_malformed() {
    let no_id = "<DescribeInstancesResponse><reservationSet><item><instancesSet><item>\
        <instanceState><name>running</name></instanceState></item></instancesSet></item>\
        </reservationSet></DescribeInstancesResponse>";
    let root = parse_xml(no_id).unwrap();
    assert!(matches!(
        parse_describe_instances(&root),
        Err(Ec2Error::Malformed(m)) if m.contains("instanceId")
    ));
    let no_state = "<DescribeInstancesResponse><reservationSet><item><instancesSet><item>\
        <instanceId>i-1</instanceId></item></instancesSet></item>\
        </reservationSet></DescribeInstancesResponse>";
    let root = parse_xml(no_state).unwrap();
    assert!(matches!(
        parse_describe_instances(&root),
        Err(Ec2Error::Malformed(m)) if m.contains("i-1")
    ));
    let other = parse_xml("<RunInstancesResponse/>").unwrap();
    assert!(parse_describe_instances(&other).is_err());
}

fn error_doc(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors>\
         <RequestID>b1a5e3f2-4bd5-4a1e-example</RequestID></Response>"
    )
}

#[test]
fn error_documents_map_to_actionable_variants() {
    let denied = error_doc(
        "UnauthorizedOperation",
        "You are not authorized to perform this operation. User: arn:aws:iam::123456789012:user/dev \
         is not authorized to perform: ec2:DescribeInstances because no identity-based policy \
         allows the ec2:DescribeInstances action",
    );
    let e = interpret_response("DescribeInstances", 403, denied.as_bytes()).unwrap_err();
    assert!(matches!(&e, Ec2Error::AccessDenied { action, .. } if action == "DescribeInstances"));
    assert!(e.to_string().contains("ec2:DescribeInstances"), "{e}");
    assert!(!e.is_retryable());

    let auth = error_doc(
        "AuthFailure",
        "AWS was not able to validate the provided access credentials",
    );
    let e = interpret_response("DescribeInstances", 401, auth.as_bytes()).unwrap_err();
    assert!(matches!(&e, Ec2Error::AuthFailure { code, .. } if code == "AuthFailure"));
    assert!(!e.is_retryable());

    let skew = error_doc(
        "RequestExpired",
        "Request has expired. Timestamp date is 2015-08-30T12:36:00Z",
    );
    let e = interpret_response("DescribeInstances", 400, skew.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("system clock"), "{e}");

    let throttled = error_doc("RequestLimitExceeded", "Request limit exceeded.");
    let e = interpret_response("DescribeInstances", 503, throttled.as_bytes()).unwrap_err();
    assert!(matches!(e, Ec2Error::Throttled { .. }));
    assert!(e.is_retryable());

    let internal = error_doc("InternalError", "An internal error has occurred");
    let e = interpret_response("DescribeInstances", 500, internal.as_bytes()).unwrap_err();
    assert!(matches!(e, Ec2Error::Service { status: 500, .. }));
    assert!(e.is_retryable());

    let bad_filter = error_doc(
        "InvalidParameterValue",
        "The filter &apos;nope&apos; is invalid",
    );
    let e = interpret_response("DescribeInstances", 400, bad_filter.as_bytes()).unwrap_err();
    assert_eq!(
        e,
        Ec2Error::Service {
            status: 400,
            code: "InvalidParameterValue".into(),
            message: "The filter 'nope' is invalid".into(),
        }
    );
    assert!(!e.is_retryable());

    // A proxy's HTML page, and nothing at all.
    let e = interpret_response(
        "DescribeInstances",
        502,
        b"<html><body>Bad\x07 Gateway</body></html>",
    )
    .unwrap_err();
    assert!(
        matches!(&e, Ec2Error::Service { status: 502, code, message }
            if code == "HTTP 502" && message.contains("Bad  Gateway")),
        "{e:?}"
    );
    assert!(e.is_retryable());
    let e = interpret_response("DescribeInstances", 403, b"").unwrap_err();
    assert!(
        matches!(&e, Ec2Error::Service { message, .. } if message == "empty answer"),
        "{e:?}"
    );
}

#[test]
fn garbage_is_an_error_never_a_panic() {
    let cases: &[&[u8]] = &[
        b"",
        b"   ",
        b"not xml at all",
        b"<DescribeInstancesResponse>",
        b"<DescribeInstancesResponse><reservationSet></DescribeInstancesResponse>",
        b"<a></a><b></b>",
        b"<DescribeInstancesResponse>&bogus;</DescribeInstancesResponse>",
        b"<DescribeInstancesResponse>&#0;</DescribeInstancesResponse>",
        b"</DescribeInstancesResponse>",
        b"text<DescribeInstancesResponse/>",
        b"<DescribeInstancesResponse/>trailing",
        b"<html><body>captive portal</body></html>",
        b"\xff\xfe<\x00D\x00",
        b"<DescribeInstancesResponse><![CDATA[unterminated",
        b"<DescribeInstancesResponse attr=\"x></DescribeInstancesResponse>",
    ];
    for body in cases {
        let r = interpret_response("DescribeInstances", 200, body);
        assert!(
            matches!(r, Err(Ec2Error::Malformed(_))),
            "{:?}: {r:?}",
            String::from_utf8_lossy(body)
        );
    }
    let deep = format!(
        "{}{}",
        "<a>".repeat(MAX_XML_DEPTH + 1),
        "</a>".repeat(MAX_XML_DEPTH + 1)
    );
    assert!(matches!(parse_xml(&deep), Err(Ec2Error::Malformed(m)) if m.contains("deeper")));
    let ok = format!(
        "{}{}",
        "<a>".repeat(MAX_XML_DEPTH),
        "</a>".repeat(MAX_XML_DEPTH)
    );
    assert!(parse_xml(&ok).is_ok());
}

#[test]
fn xml_text_entities_cdata_and_prefixes() {
    let root = parse_xml(
        "<?xml version=\"1.0\"?><!-- c --><ec2:R xmlns:ec2=\"urn:x\"><ec2:v>a &amp; b &lt;c&gt; \
         &#233;&#x41;&quot;&apos;</ec2:v><w><![CDATA[<raw> & ]]></w><e/><s>  spaced  </s></ec2:R>",
    )
    .unwrap();
    assert_eq!(root.name, "R");
    assert_eq!(root.child_text("v"), Some("a & b <c> éA\"'"));
    assert_eq!(root.child_text("w"), Some("<raw> & "));
    assert_eq!(root.child_text("e"), Some(""));
    assert_eq!(root.child_text("s"), Some("  spaced  "));
    assert_eq!(root.find("w").map(|w| w.name.as_str()), Some("w"));
    assert!(root.path(&["v", "nope"]).is_none());
    // A byte order mark before the declaration.
    assert_eq!(
        parse_xml("\u{feff}<?xml version=\"1.0\"?><a/>")
            .unwrap()
            .name,
        "a"
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), status in 100u16..600) {
        let _ = interpret_response("DescribeInstances", status, &body);
    }

    #[test]
    fn arbitrary_markup_never_panics(s in "[<>/a-c&;#x0-9 \"=!\\[\\]CDATA?-]{0,200}") {
        let _ = parse_xml(&s);
        let _ = interpret_response("DescribeInstances", 200, s.as_bytes());
    }
}

#[test]
fn form_encoding_and_filters() {
    let tags = BTreeMap::from([
        ("Name".to_owned(), "bastion *1?".to_owned()),
        ("env".to_owned(), "prod/é".to_owned()),
    ]);
    let filters = running_with_tags_filters(&tags);
    assert_eq!(filters.len(), 3);
    assert_eq!(filters[0], Filter::new("tag:Name", [r"bastion \*1\?"]));
    assert_eq!(filters[2], Filter::new("instance-state-name", ["running"]));
    let body = encode_form("DescribeInstances", &filter_params(&filters));
    assert_eq!(
        body,
        "Action=DescribeInstances&Version=2016-11-15\
         &Filter.1.Name=tag%3AName&Filter.1.Value.1=bastion%20%5C%2A1%5C%3F\
         &Filter.2.Name=tag%3Aenv&Filter.2.Value.1=prod%2F%C3%A9\
         &Filter.3.Name=instance-state-name&Filter.3.Value.1=running"
    );
    assert_eq!(escape_filter_value(r"a\b"), r"a\\b");
    let multi = filter_params(&[Filter::new("instance-id", ["i-1", "i-2"])]);
    assert_eq!(
        multi,
        [
            ("Filter.1.Name".to_owned(), "instance-id".to_owned()),
            ("Filter.1.Value.1".to_owned(), "i-1".to_owned()),
            ("Filter.1.Value.2".to_owned(), "i-2".to_owned()),
        ]
    );
    assert_eq!(describe_tags(&tags), "Name=bastion *1?, env=prod/é");
}

fn instance(id: &str, launched: Option<&str>) -> Instance {
    Instance {
        id: id.to_owned(),
        state: "running".to_owned(),
        launch_time: launched.map(at),
        instance_type: None,
        private_ip: None,
        availability_zone: None,
        tags: BTreeMap::new(),
    }
}

#[test]
fn candidates_newest_first_then_by_id() {
    let mut list = vec![
        instance("i-0c", Some("2026-01-01T00:00:00Z")),
        instance("i-0z", None),
        instance("i-0b", Some("2026-03-01T00:00:00Z")),
        instance("i-0a", Some("2026-03-01T00:00:00Z")),
        instance("i-0b", Some("2026-03-01T00:00:00Z")),
    ];
    order_candidates(&mut list);
    let ids: Vec<_> = list.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["i-0a", "i-0b", "i-0c", "i-0z"]);
}

// --- endpoints ----------------------------------------------------------------------

#[derive(Debug)]
struct FakeServiceConfig(Option<&'static str>);

impl LoadServiceConfig for FakeServiceConfig {
    fn load_config(&self, key: ServiceConfigKey<'_>) -> Option<String> {
        assert_eq!(key.env(), "AWS_ENDPOINT_URL");
        assert_eq!(key.profile(), "endpoint_url");
        (key.service_id() == "EC2").then(|| self.0.map(str::to_owned))?
    }
}

fn config(region: &str) -> aws_types::sdk_config::Builder {
    SdkConfig::builder()
        .region(Region::new(region.to_owned()))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        )))
}

#[test]
fn endpoint_resolution_order() {
    // Nothing configured: the public endpoint.
    let c = config("eu-west-1").build();
    assert_eq!(
        resolve_endpoint(&c, "eu-west-1").unwrap(),
        "https://ec2.eu-west-1.amazonaws.com"
    );
    // AWS_ENDPOINT_URL (global).
    let c = config("eu-west-1")
        .endpoint_url("http://127.0.0.1:4566")
        .service_config(FakeServiceConfig(None))
        .build();
    assert_eq!(
        resolve_endpoint(&c, "eu-west-1").unwrap(),
        "http://127.0.0.1:4566"
    );
    // AWS_ENDPOINT_URL_EC2 wins over the global one.
    let c = config("eu-west-1")
        .endpoint_url("http://127.0.0.1:4566")
        .service_config(FakeServiceConfig(Some("http://127.0.0.1:5000")))
        .build();
    assert_eq!(
        resolve_endpoint(&c, "eu-west-1").unwrap(),
        "http://127.0.0.1:5000"
    );
    // An endpoint set in code wins over everything.
    let mut b = config("eu-west-1")
        .endpoint_url("http://in-code:1")
        .service_config(FakeServiceConfig(Some("http://127.0.0.1:5000")));
    b.insert_origin("endpoint_url", aws_types::origin::Origin::shared_config());
    assert_eq!(
        resolve_endpoint(&b.build(), "eu-west-1").unwrap(),
        "http://in-code:1"
    );

    assert_eq!(
        default_endpoint("us-east-1", true, false),
        "https://ec2-fips.us-east-1.amazonaws.com"
    );
    assert_eq!(
        default_endpoint("us-east-1", false, true),
        "https://ec2.us-east-1.api.aws"
    );
    assert_eq!(
        default_endpoint("cn-north-1", false, false),
        "https://ec2.cn-north-1.amazonaws.com.cn"
    );
}

#[test]
fn endpoint_urls_are_checked() {
    let e = Endpoint::parse("http://127.0.0.1:5000").unwrap();
    assert_eq!(e.request_uri(), "http://127.0.0.1:5000/");
    assert_eq!(e.host, "127.0.0.1:5000");
    let e = Endpoint::parse("https://proxy.example/ec2/").unwrap();
    assert_eq!(e.request_uri(), "https://proxy.example/ec2/");
    assert_eq!(e.host, "proxy.example");
    for bad in [
        "ftp://x",
        "127.0.0.1:5000",
        "http://",
        "http://x/?a=b",
        "http://u:p@x/",
        "",
    ] {
        assert!(
            matches!(Endpoint::parse(bad), Err(Ec2Error::Config(_))),
            "{bad}"
        );
    }
}

#[test]
fn client_needs_a_sane_region_and_credentials() {
    let none = SdkConfig::builder().build();
    assert!(matches!(Ec2Api::new(&none), Err(Ec2Error::Config(m)) if m.contains("no AWS region")));
    let c = config("us-east-1.evil.example/").build();
    assert!(matches!(Ec2Api::new(&c), Err(Ec2Error::Config(_))));
    let c = SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .build();
    assert!(matches!(Ec2Api::new(&c), Err(Ec2Error::Credentials(_))));
    let api = Ec2Api::new(&config("us-east-1").build()).unwrap();
    assert_eq!(api.endpoint(), "https://ec2.us-east-1.amazonaws.com");
    assert_eq!(api.region(), "us-east-1");
    let debug = format!("{api:?}");
    assert!(
        !debug.contains("wJalr") && !debug.contains("AKID"),
        "{debug}"
    );
}

// --- signing ------------------------------------------------------------------------

const SUITE_TIME: &str = "2015-08-30T12:36:00Z";
const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// aws-sigv4's test suite, `post-vanilla`.
#[test]
fn sigv4_suite_post_vanilla() {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("https://example.amazonaws.com/")
        .header("host", "example.amazonaws.com")
        .body(())
        .unwrap();
    let creds = Credentials::new("AKIDEXAMPLE", SUITE_SECRET, None, None, "test");
    sign_request(
        &mut req,
        b"",
        &creds,
        "us-east-1",
        "service",
        at(SUITE_TIME),
    )
    .unwrap();
    assert_eq!(req.headers()["x-amz-date"], "20150830T123600Z");
    assert_eq!(
        req.headers()["authorization"],
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
         SignedHeaders=host;x-amz-date, \
         Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
    );
}

/// aws-sigv4's test suite, `get-vanilla-with-session-token`.
#[test]
fn sigv4_suite_session_token() {
    let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
    let mut req = http::Request::builder()
        .method("GET")
        .uri("https://example.amazonaws.com/")
        .header("host", "example.amazonaws.com")
        .body(())
        .unwrap();
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        SUITE_SECRET,
        Some(token.to_owned()),
        None,
        "test",
    );
    sign_request(
        &mut req,
        b"",
        &creds,
        "us-east-1",
        "service",
        at(SUITE_TIME),
    )
    .unwrap();
    assert_eq!(req.headers()["x-amz-security-token"], token);
    assert!(req.headers()["x-amz-security-token"].is_sensitive());
    assert!(req.headers()["authorization"].is_sensitive());
    assert_eq!(
        req.headers()["authorization"],
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
         SignedHeaders=host;x-amz-date;x-amz-security-token, \
         Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
    );
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The request the client sends, signed, checked against SigV4 computed here from the
/// specification (canonical request, string to sign, derived key).
#[test]
fn ec2_request_signature_matches_the_specification() {
    let api = Ec2Api::new(&config("us-east-1").build()).unwrap();
    let creds = Credentials::new("AKIDEXAMPLE", SUITE_SECRET, None, None, "test");
    let body = encode_form(
        "DescribeInstances",
        &filter_params(&[Filter::tag_equals("Name", "bastion")]),
    );
    let time = at("2026-02-03T04:05:06Z");
    let req = api.request_at(&body, &creds, time).unwrap();
    assert_eq!(req.method(), "POST");
    assert_eq!(req.uri(), "https://ec2.us-east-1.amazonaws.com/");
    let h = req.headers();
    assert_eq!(h["host"], "ec2.us-east-1.amazonaws.com");
    assert_eq!(
        h["content-type"],
        "application/x-www-form-urlencoded; charset=utf-8"
    );
    assert_eq!(h["x-amz-date"], "20260203T040506Z");
    assert!(h.get("x-amz-security-token").is_none());
    assert_eq!(req.body().bytes(), Some(body.as_bytes()));

    let canonical = format!(
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\n\
         host:ec2.us-east-1.amazonaws.com\nx-amz-date:20260203T040506Z\n\n\
         content-type;host;x-amz-date\n{}",
        sha256_hex(body.as_bytes())
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n20260203T040506Z\n20260203/us-east-1/ec2/aws4_request\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let k_date = hmac(format!("AWS4{SUITE_SECRET}").as_bytes(), "20260203");
    let k_region = hmac(&k_date, "us-east-1");
    let k_service = hmac(&k_region, "ec2");
    let k_signing = hmac(&k_service, "aws4_request");
    let signature = hex::encode(hmac(&k_signing, &string_to_sign));
    assert_eq!(
        h["authorization"],
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260203/us-east-1/ec2/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={signature}"
        )
        .as_str()
    );
}

// --- credentials cache ------------------------------------------------------------

#[derive(Debug)]
struct Counting {
    calls: Arc<AtomicUsize>,
    expiry: Option<SystemTime>,
}

impl ProvideCredentials for Counting {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        future::ProvideCredentials::ready(Ok(Credentials::new(
            "AKIDCOUNT",
            "secret",
            None,
            self.expiry,
            "counting",
        )))
    }
}

fn counting_api(expiry: Option<SystemTime>, endpoint: &str) -> (Ec2Api, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let config = SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Counting {
            calls: calls.clone(),
            expiry,
        }))
        .endpoint_url(endpoint)
        .build();
    let settings = Ec2Settings {
        attempt_timeout: Duration::from_millis(1500),
        initial_backoff: Duration::from_millis(10),
        ..Ec2Settings::default()
    };
    (Ec2Api::with_settings(&config, settings).unwrap(), calls)
}

#[tokio::test]
async fn credentials_are_cached_until_near_expiry() {
    let (api, calls) = counting_api(None, "http://127.0.0.1:9");
    api.credentials().await.unwrap();
    api.credentials().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let soon = SystemTime::now() + Duration::from_secs(60);
    let (api, calls) = counting_api(Some(soon), "http://127.0.0.1:9");
    api.credentials().await.unwrap();
    api.credentials().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refreshed when near expiry"
    );
}

// --- calls against a local HTTP server ----------------------------------------------

#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<(http::HeaderMap, String)>>>,
}

/// What the fake endpoint answers: status and body, or `None` for never.
type Answer = Option<(u16, String)>;

/// Serves `answers` in turn (the last one repeats); `None` never answers.
async fn fake_ec2(answers: Vec<Answer>) -> (String, Seen) {
    use axum::extract::State;
    use axum::response::IntoResponse;
    let seen = Seen::default();
    let answers = Arc::new(answers);
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(
                |State((seen, answers)): State<(Seen, Arc<Vec<Answer>>)>,
                 headers: http::HeaderMap,
                 body: String| async move {
                    let n = {
                        let mut r = seen.requests.lock().unwrap();
                        r.push((headers, body));
                        r.len()
                    };
                    match answers[(n - 1).min(answers.len() - 1)].clone() {
                        Some((status, xml)) => (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            [("content-type", "text/xml;charset=UTF-8")],
                            xml,
                        )
                            .into_response(),
                        None => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            ().into_response()
                        }
                    }
                },
            ),
        )
        .with_state((seen.clone(), answers));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

fn page(ids: &[&str], next: Option<&str>) -> String {
    let items: String = ids
        .iter()
        .map(|id| {
            format!(
                "<item><reservationId>r-{id}</reservationId><instancesSet><item>\
                 <instanceId>{id}</instanceId><instanceState><code>16</code><name>running</name>\
                 </instanceState><tagSet><item><key>Name</key><value>bastion</value></item>\
                 </tagSet></item></instancesSet></item>"
            )
        })
        .collect();
    let next = next.map_or(String::new(), |t| format!("<nextToken>{t}</nextToken>"));
    format!(
        "<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
         <requestId>r</requestId><reservationSet>{items}</reservationSet>{next}\
         </DescribeInstancesResponse>"
    )
}

#[tokio::test]
async fn pages_are_followed_and_requests_are_signed_forms() {
    let (url, seen) = fake_ec2(vec![
        Some((200, page(&["i-01", "i-02"], Some("tok+/=1")))),
        Some((200, page(&["i-03"], None))),
    ])
    .await;
    let (api, _) = counting_api(None, &url);
    let tags = BTreeMap::from([("Name".to_owned(), "bastion".to_owned())]);
    let found = api.running_instances_with_tags(&tags).await.unwrap();
    let ids: Vec<_> = found.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["i-01", "i-02", "i-03"]);
    let requests = seen.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let (headers, body) = &requests[0];
    assert_eq!(
        body,
        "Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=tag%3AName\
         &Filter.1.Value.1=bastion&Filter.2.Name=instance-state-name&Filter.2.Value.1=running"
    );
    let auth = headers["authorization"].to_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDCOUNT/")
            && auth.contains("/us-east-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="),
        "{auth}"
    );
    assert!(
        headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("bastion/")
    );
    assert!(
        requests[1].1.ends_with("&NextToken=tok%2B%2F%3D1"),
        "{}",
        requests[1].1
    );
}

#[tokio::test]
async fn throttling_is_retried_and_access_denied_is_not() {
    let throttled = error_doc("RequestLimitExceeded", "Request limit exceeded.");
    let (url, seen) = fake_ec2(vec![
        Some((503, throttled.clone())),
        Some((200, page(&["i-01"], None))),
    ])
    .await;
    let (api, _) = counting_api(None, &url);
    let found = api.describe_instances(&[]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(seen.requests.lock().unwrap().len(), 2);

    let (url, seen) = fake_ec2(vec![Some((503, throttled))]).await;
    let (api, _) = counting_api(None, &url);
    let e = api.describe_instances(&[]).await.unwrap_err();
    assert!(matches!(e, Ec2Error::Throttled { .. }), "{e:?}");
    assert_eq!(seen.requests.lock().unwrap().len(), 3, "max_attempts");

    let denied = error_doc("UnauthorizedOperation", "You are not authorized.");
    let (url, seen) = fake_ec2(vec![Some((403, denied))]).await;
    let (api, _) = counting_api(None, &url);
    let e = api.describe_instances(&[]).await.unwrap_err();
    assert!(matches!(e, Ec2Error::AccessDenied { .. }), "{e:?}");
    assert_eq!(seen.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn auth_failure_drops_cached_credentials() {
    let auth = error_doc(
        "AuthFailure",
        "AWS was not able to validate the credentials",
    );
    let (url, _) = fake_ec2(vec![Some((401, auth))]).await;
    let (api, calls) = counting_api(None, &url);
    assert!(matches!(
        api.describe_instances(&[]).await,
        Err(Ec2Error::AuthFailure { .. })
    ));
    assert!(matches!(
        api.describe_instances(&[]).await,
        Err(Ec2Error::AuthFailure { .. })
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_silent_endpoint_times_out_and_a_closed_port_is_a_transport_error() {
    let (url, seen) = fake_ec2(vec![None]).await;
    let (api, _) = counting_api(None, &url);
    let started = Instant::now();
    let e = api.describe_instances(&[]).await.unwrap_err();
    assert!(matches!(e, Ec2Error::Timeout { .. }), "{e:?}");
    assert_eq!(seen.requests.lock().unwrap().len(), 3);
    assert!(started.elapsed() < Duration::from_secs(10));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (api, _) = counting_api(None, &format!("http://{closed}"));
    let e = api.describe_instances(&[]).await.unwrap_err();
    assert!(
        matches!(&e, Ec2Error::Transport { endpoint, .. } if endpoint.contains(&closed.to_string())),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_repeated_next_token_stops_the_loop() {
    let (url, _) = fake_ec2(vec![Some((200, page(&["i-01"], Some("same"))))]).await;
    let (api, _) = counting_api(None, &url);
    let e = api.describe_instances(&[]).await.unwrap_err();
    assert!(matches!(e, Ec2Error::Malformed(m) if m.contains("nextToken")));
}

// ---------------------------------------------------------------------------------------
// RunInstances / TerminateInstances

#[test]
fn launch_errors_map_to_capacity_quota_and_invalid_parameter() {
    let cases: &[(&str, &str)] = &[
        ("InsufficientInstanceCapacity", "capacity"),
        ("InsufficientHostCapacity", "capacity"),
        ("InsufficientCapacity", "capacity"),
        ("InsufficientReservedInstanceCapacity", "capacity"),
        ("InsufficientFreeAddressesInSubnet", "capacity"),
        ("InstanceLimitExceeded", "quota"),
        ("VcpuLimitExceeded", "quota"),
        ("MaxSpotInstanceCountExceeded", "quota"),
        ("ResourceLimitExceeded", "quota"),
        ("VolumeLimitExceeded", "quota"),
        ("InvalidSubnetID.NotFound", "invalid"),
        ("InvalidGroup.NotFound", "invalid"),
        ("InvalidAMIID.NotFound", "invalid"),
        ("InvalidAMIID.Malformed", "invalid"),
        ("InvalidParameterValue", "invalid"),
        ("InvalidParameterCombination", "invalid"),
        ("InvalidLaunchTemplateName.NotFoundException", "invalid"),
        ("InvalidLaunchTemplateId.NotFound", "invalid"),
        ("InvalidKeyPair.NotFound", "invalid"),
        ("NoSuchEntity", "invalid"),
        ("RequestLimitExceeded", "throttled"),
        ("BandwidthLimitExceeded", "throttled"),
        ("UnauthorizedOperation", "denied"),
        ("IdempotentParameterMismatch", "service"),
    ];
    for (code, kind) in cases {
        let e = Ec2Error::from_code("RunInstances", 400, code, "m");
        let got = match &e {
            Ec2Error::Capacity { code: c, .. } => {
                assert!(e.to_string().contains("retry later"), "{e}");
                ("capacity", c.as_str())
            }
            Ec2Error::Quota { code: c, .. } => {
                assert!(e.to_string().contains("Service Quotas"), "{e}");
                ("quota", c.as_str())
            }
            Ec2Error::InvalidParameter { code: c, .. } => {
                assert!(e.to_string().contains("subnet"), "{e}");
                ("invalid", c.as_str())
            }
            Ec2Error::Throttled { code: c, .. } => ("throttled", c.as_str()),
            Ec2Error::AccessDenied { .. } => ("denied", *code),
            Ec2Error::Service { code: c, .. } => ("service", c.as_str()),
            other => panic!("{code}: {other:?}"),
        };
        assert_eq!(got, (*kind, *code), "{code}");
        assert!(!e.is_retryable() || *kind == "throttled", "{code}");
    }
    // Outside RunInstances an invalid parameter is our bug, not a launch setting.
    assert!(matches!(
        Ec2Error::from_code("DescribeInstances", 400, "InvalidParameterValue", "m"),
        Ec2Error::Service { .. }
    ));
    // Quotas and capacity read the same from any action.
    assert!(matches!(
        Ec2Error::from_code("StartInstances", 400, "InsufficientInstanceCapacity", "m"),
        Ec2Error::Capacity { .. }
    ));
}

fn pairs(p: &[(String, String)]) -> Vec<(&str, &str)> {
    p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn run_instances_parameters() {
    let spec = LaunchSpec {
        launch_template: Some(LaunchTemplateRef {
            id_or_name: "lt-0abcd1234ef567890".into(),
            version: Some("$Latest".into()),
        }),
        image_id: Some("ami-0d27e0fb3bac4d724".into()),
        instance_type: Some("t3.micro".into()),
        subnet_id: Some("subnet-1".into()),
        security_group_ids: vec!["sg-1".into(), "sg-2".into()],
        instance_profile: Some("arn:aws:iam::123456789012:instance-profile/bastion".into()),
        user_data: Some("#!/bin/sh\necho ok>>/x?\n".into()),
        tags: BTreeMap::from([
            ("Name".to_owned(), "bastion".to_owned()),
            ("bastion:launch-id".to_owned(), "L".to_owned()),
        ]),
        client_token: "5b1c7d2e-0000-4000-8000-000000000001".into(),
        shutdown_terminates: true,
    };
    let p = run_instances_params(&spec);
    assert_eq!(
        pairs(&p),
        [
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", "5b1c7d2e-0000-4000-8000-000000000001"),
            ("LaunchTemplate.LaunchTemplateId", "lt-0abcd1234ef567890"),
            ("LaunchTemplate.Version", "$Latest"),
            ("ImageId", "ami-0d27e0fb3bac4d724"),
            ("InstanceType", "t3.micro"),
            ("SubnetId", "subnet-1"),
            ("SecurityGroupId.1", "sg-1"),
            ("SecurityGroupId.2", "sg-2"),
            (
                "IamInstanceProfile.Arn",
                "arn:aws:iam::123456789012:instance-profile/bastion"
            ),
            ("UserData", "IyEvYmluL3NoCmVjaG8gb2s+Pi94Pwo="),
            ("InstanceInitiatedShutdownBehavior", "terminate"),
            ("MetadataOptions.HttpTokens", "required"),
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "Name"),
            ("TagSpecification.1.Tag.1.Value", "bastion"),
            ("TagSpecification.1.Tag.2.Key", "bastion:launch-id"),
            ("TagSpecification.1.Tag.2.Value", "L"),
            ("TagSpecification.2.ResourceType", "volume"),
            ("TagSpecification.2.Tag.1.Key", "Name"),
            ("TagSpecification.2.Tag.1.Value", "bastion"),
            ("TagSpecification.2.Tag.2.Key", "bastion:launch-id"),
            ("TagSpecification.2.Tag.2.Value", "L"),
        ]
    );
    // Base64 `+` and `=` are percent-encoded in the form body.
    let body = encode_form("RunInstances", &p);
    assert!(
        body.contains("&UserData=IyEvYmluL3NoCmVjaG8gb2s%2BPi94Pwo%3D&"),
        "{body}"
    );
    assert!(
        body.contains("&LaunchTemplate.Version=%24Latest&"),
        "{body}"
    );

    // A template by name, a profile by name, nothing else.
    let minimal = LaunchSpec {
        launch_template: Some(LaunchTemplateRef {
            id_or_name: "bastion-template".into(),
            version: None,
        }),
        instance_profile: Some("bastion".into()),
        client_token: "t".into(),
        ..LaunchSpec::default()
    };
    assert_eq!(
        pairs(&run_instances_params(&minimal)),
        [
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", "t"),
            ("LaunchTemplate.LaunchTemplateName", "bastion-template"),
            ("IamInstanceProfile.Name", "bastion"),
            ("MetadataOptions.HttpTokens", "required"),
        ]
    );
}

const RUN_INSTANCES: &str = r#"<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <reservationId>r-1234567890abcdef0</reservationId>
  <ownerId>123456789012</ownerId>
  <groupSet/>
  <instancesSet>
    <item>
      <instanceId>i-1234567890abcdef0</instanceId>
      <imageId>ami-0d27e0fb3bac4d724</imageId>
      <instanceState><code>0</code><name>pending</name></instanceState>
      <instanceType>t3.micro</instanceType>
      <launchTime>2026-11-23T08:00:00.000Z</launchTime>
      <placement><availabilityZone>us-east-1a</availabilityZone></placement>
      <privateIpAddress>10.0.0.12</privateIpAddress>
      <tagSet><item><key>bastion:launch-id</key><value>L</value></item></tagSet>
    </item>
  </instancesSet>
</RunInstancesResponse>"#;

const TERMINATE_INSTANCES: &str = r#"<TerminateInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <instancesSet>
    <item>
      <instanceId>i-1234567890abcdef0</instanceId>
      <currentState><code>32</code><name>shutting-down</name></currentState>
      <previousState><code>16</code><name>running</name></previousState>
    </item>
    <item>
      <instanceId>i-0598c7d356eba48d7</instanceId>
      <currentState><code>48</code><name>terminated</name></currentState>
      <previousState><code>48</code><name>terminated</name></previousState>
    </item>
  </instancesSet>
</TerminateInstancesResponse>"#;

#[test]
fn run_and_terminate_answers_parse() {
    let root = interpret_response("RunInstances", 200, RUN_INSTANCES.as_bytes()).unwrap();
    let i = parse_run_instances(&root).unwrap();
    assert_eq!(i.id, "i-1234567890abcdef0");
    assert_eq!(i.state, "pending");
    assert_eq!(i.instance_type.as_deref(), Some("t3.micro"));
    assert_eq!(i.private_ip.as_deref(), Some("10.0.0.12"));
    assert_eq!(i.tags["bastion:launch-id"], "L");
    assert_eq!(i.launch_time, Some(at("2026-11-23T08:00:00Z")));

    let empty = parse_xml("<RunInstancesResponse><instancesSet/></RunInstancesResponse>").unwrap();
    assert!(matches!(
        parse_run_instances(&empty),
        Err(Ec2Error::Malformed(_))
    ));

    let root =
        interpret_response("TerminateInstances", 200, TERMINATE_INSTANCES.as_bytes()).unwrap();
    assert_eq!(
        parse_terminate_instances(&root).unwrap(),
        [
            ("i-1234567890abcdef0".to_owned(), "shutting-down".to_owned()),
            ("i-0598c7d356eba48d7".to_owned(), "terminated".to_owned()),
        ]
    );
    let bad = parse_xml(
        "<TerminateInstancesResponse><instancesSet><item><instanceId>i-1</instanceId>\
         </item></instancesSet></TerminateInstancesResponse>",
    )
    .unwrap();
    assert!(matches!(
        parse_terminate_instances(&bad),
        Err(Ec2Error::Malformed(_))
    ));
}

#[test]
fn ids_in_not_found_messages() {
    use super::launch::ids_in_message;
    assert_eq!(
        ids_in_message("The instance ID 'i-0123456789abcdef0' does not exist"),
        ["i-0123456789abcdef0"]
    );
    assert_eq!(
        ids_in_message("The instance IDs 'i-1a, i-2b' do not exist"),
        ["i-1a", "i-2b"]
    );
    assert!(ids_in_message("not found").is_empty());
}

#[test]
fn tag_and_state_filters() {
    let tags = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
    assert_eq!(
        tags_and_states_filters(&tags, &["pending", "running"]),
        [
            Filter::new("tag:k", ["v"]),
            Filter::new("instance-state-name", ["pending", "running"]),
        ]
    );
    assert_eq!(
        tags_and_states_filters(&tags, &[]),
        [Filter::new("tag:k", ["v"])]
    );
}
