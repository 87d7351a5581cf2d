//! One JSON `Listener` (v2 or v3, snake or camel case) to the v3 message: every field that
//! decides which filter chain a connection lands on, and the chains' filters and transport
//! sockets. What is left out is noted, never guessed.

use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, Pipe, SocketAddress, TrafficDirection, TransportSocket,
    address::Address as AddressKind, socket_address::PortSpecifier,
    socket_address::Protocol as SocketProtocol, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    AdditionalAddress, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
    ListenerFilterChainMatchPredicate, filter,
    filter_chain_match::ConnectionSourceType,
    listener_filter,
    listener_filter_chain_match_predicate::{MatchSet, Rule},
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::envoy::r#type::v3::Int32Range;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::r#type::matcher::v3::Matcher;
use prost::{Message, Name};

use super::DumpError;
use super::json::{Node, Notes};
use super::{tls, typed};

/// The name istiod gives the sidecar's inbound listener.
const VIRTUAL_INBOUND: &str = "virtualInbound";

/// Reads one Listener object.
pub(super) fn listener(node: &Node<'_>, notes: &mut Notes) -> Result<Listener, DumpError> {
    let mut fields = node.object("Listener")?;
    if let Some(url) = fields.type_url()? {
        let name = url.rsplit('/').next().unwrap_or(&url);
        let v3 = typed::v3_type_name(name).unwrap_or_else(|| name.to_owned());
        if v3 != Listener::full_name() {
            return Err(node.error(format!("expected a Listener, found @type {url}")));
        }
    }

    let mut listener = Listener::default();
    if let Some(node) = fields.get("name")? {
        listener.name = node.string()?;
    }
    if let Some(node) = fields.get("address")? {
        listener.address = Some(address(&node, notes)?);
    }
    if let Some(node) = fields.get("additional_addresses")? {
        for item in node.array()? {
            let mut additional = item.object("AdditionalAddress")?;
            let address = match additional.get("address")? {
                Some(node) => Some(address(&node, notes)?),
                None => None,
            };
            additional.finish(notes);
            listener.additional_addresses.push(AdditionalAddress {
                address,
                ..Default::default()
            });
        }
    }
    if let Some(node) = fields.get("stat_prefix")? {
        listener.stat_prefix = node.string()?;
    }
    if let Some(node) = fields.get("filter_chains")? {
        listener.filter_chains = node
            .array()?
            .iter()
            .map(|n| filter_chain(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("default_filter_chain")? {
        listener.default_filter_chain = Some(filter_chain(&node, notes)?);
    }
    if fields.get("filter_chain_matcher")?.is_some() {
        // Only its presence matters: the rewrite leaves such a listener alone.
        listener.filter_chain_matcher = Some(Matcher::default());
        notes.add(
            "filter_chain_matcher present: kept as an empty matcher (its rules are not converted)",
        );
    }
    if let Some(node) = fields.get("use_original_dst")? {
        listener.use_original_dst = Some(node.bool_value()?);
    }
    if let Some(node) = fields.get("listener_filters")? {
        listener.listener_filters = node
            .array()?
            .iter()
            .map(|n| listener_filter(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("listener_filters_timeout")? {
        listener.listener_filters_timeout = Some(node.duration()?);
    }
    if let Some(node) = fields.get("continue_on_listener_filters_timeout")? {
        listener.continue_on_listener_filters_timeout = node.bool()?;
    }
    if let Some(node) = fields.get("transparent")? {
        listener.transparent = Some(node.bool_value()?);
    }
    if let Some(node) = fields.get("freebind")? {
        listener.freebind = Some(node.bool_value()?);
    }
    if let Some(node) = fields.get("bind_to_port")? {
        listener.bind_to_port = Some(node.bool_value()?);
    }
    match fields.get("traffic_direction")? {
        Some(node) => {
            listener.traffic_direction =
                node.enumeration("TrafficDirection", TrafficDirection::from_str_name)?;
        }
        // Istio before 1.5 did not set the direction; its inbound listener is known by name.
        None if listener.name == VIRTUAL_INBOUND => {
            listener.traffic_direction = TrafficDirection::Inbound as i32;
            notes.add(
                "traffic_direction absent (dump from before Istio 1.5): INBOUND inferred from \
                 the name virtualInbound",
            );
        }
        None => {}
    }
    fields.finish(notes);
    Ok(listener)
}

fn address(node: &Node<'_>, notes: &mut Notes) -> Result<Address, DumpError> {
    let mut fields = node.object("Address")?;
    let mut kind = None;
    if let Some(node) = fields.get("socket_address")? {
        kind = Some(AddressKind::SocketAddress(socket_address(&node, notes)?));
    }
    if let Some(node) = fields.get("pipe")? {
        let mut pipe_fields = node.object("Pipe")?;
        let mut pipe = Pipe::default();
        if let Some(node) = pipe_fields.get("path")? {
            pipe.path = node.string()?;
        }
        if let Some(node) = pipe_fields.get("mode")? {
            pipe.mode = node.u32()?;
        }
        pipe_fields.finish(notes);
        kind = Some(AddressKind::Pipe(pipe));
    }
    fields.finish(notes);
    Ok(Address { address: kind })
}

fn socket_address(node: &Node<'_>, notes: &mut Notes) -> Result<SocketAddress, DumpError> {
    let mut fields = node.object("SocketAddress")?;
    let mut socket = SocketAddress::default();
    if let Some(node) = fields.get("protocol")? {
        socket.protocol =
            node.enumeration("SocketAddress.Protocol", SocketProtocol::from_str_name)?;
    }
    if let Some(node) = fields.get("address")? {
        socket.address = node.string()?;
    }
    if let Some(node) = fields.get("port_value")? {
        socket.port_specifier = Some(PortSpecifier::PortValue(node.u32()?));
    }
    if let Some(node) = fields.get("named_port")? {
        socket.port_specifier = Some(PortSpecifier::NamedPort(node.string()?));
    }
    if let Some(node) = fields.get("resolver_name")? {
        socket.resolver_name = node.string()?;
    }
    if let Some(node) = fields.get("ipv4_compat")? {
        socket.ipv4_compat = node.bool()?;
    }
    fields.finish(notes);
    Ok(socket)
}

fn filter_chain(node: &Node<'_>, notes: &mut Notes) -> Result<FilterChain, DumpError> {
    let mut fields = node.object("FilterChain")?;
    let mut chain = FilterChain::default();
    if let Some(node) = fields.get("name")? {
        chain.name = node.string()?;
    }
    if let Some(node) = fields.get("filter_chain_match")? {
        chain.filter_chain_match = Some(filter_chain_match(&node, notes)?);
    }
    if let Some(node) = fields.get("filters")? {
        chain.filters = node
            .array()?
            .iter()
            .map(|n| network_filter(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("transport_socket")? {
        chain.transport_socket = Some(transport_socket(&node, notes)?);
    }
    // v2 put the server TLS settings straight on the chain; v3 has them in a transport socket.
    if let Some(node) = fields.get("tls_context")? {
        if chain.transport_socket.is_some() {
            return Err(node.error("a chain may not have both tls_context and transport_socket"));
        }
        let context = tls::downstream_tls_context(node.object("DownstreamTlsContext")?, notes)?;
        chain.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".to_owned(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url: DownstreamTlsContext::type_url(),
                value: context.encode_to_vec(),
            })),
        });
        notes.add("v2 tls_context converted to a transport_socket envoy.transport_sockets.tls");
    }
    if let Some(node) = fields.get("transport_socket_connect_timeout")? {
        chain.transport_socket_connect_timeout = Some(node.duration()?);
    }
    fields.finish(notes);
    Ok(chain)
}

fn filter_chain_match(node: &Node<'_>, notes: &mut Notes) -> Result<FilterChainMatch, DumpError> {
    let mut fields = node.object("FilterChainMatch")?;
    let mut matched = FilterChainMatch::default();
    if let Some(node) = fields.get("destination_port")? {
        matched.destination_port = Some(node.u32_value()?);
    }
    if let Some(node) = fields.get("prefix_ranges")? {
        matched.prefix_ranges = cidr_ranges(&node, notes)?;
    }
    if let Some(node) = fields.get("address_suffix")? {
        matched.address_suffix = node.string()?;
    }
    if let Some(node) = fields.get("suffix_len")? {
        matched.suffix_len = Some(node.u32_value()?);
    }
    if let Some(node) = fields.get("direct_source_prefix_ranges")? {
        matched.direct_source_prefix_ranges = cidr_ranges(&node, notes)?;
    }
    if let Some(node) = fields.get("source_type")? {
        matched.source_type =
            node.enumeration("ConnectionSourceType", ConnectionSourceType::from_str_name)?;
    }
    if let Some(node) = fields.get("source_prefix_ranges")? {
        matched.source_prefix_ranges = cidr_ranges(&node, notes)?;
    }
    if let Some(node) = fields.get("source_ports")? {
        matched.source_ports = node
            .array()?
            .iter()
            .map(Node::u32)
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("server_names")? {
        matched.server_names = node.strings()?;
    }
    if let Some(node) = fields.get("transport_protocol")? {
        matched.transport_protocol = node.string()?;
    }
    if let Some(node) = fields.get("application_protocols")? {
        matched.application_protocols = node.strings()?;
    }
    fields.finish(notes);
    Ok(matched)
}

fn cidr_ranges(node: &Node<'_>, notes: &mut Notes) -> Result<Vec<CidrRange>, DumpError> {
    let mut ranges = Vec::new();
    for item in node.array()? {
        let mut fields = item.object("CidrRange")?;
        let mut range = CidrRange::default();
        if let Some(node) = fields.get("address_prefix")? {
            range.address_prefix = node.string()?;
        }
        if let Some(node) = fields.get("prefix_len")? {
            range.prefix_len = Some(node.u32_value()?);
        }
        fields.finish(notes);
        ranges.push(range);
    }
    Ok(ranges)
}

/// The two ways a filter carries its settings: v3 `typed_config`, or v2 `config`.
fn filter_config(
    name: &str,
    fields: &mut super::json::Fields<'_>,
    notes: &mut Notes,
) -> Result<Option<Any>, DumpError> {
    let typed = match fields.get("typed_config")? {
        Some(node) => Some(typed::any(&node, notes)?),
        None => None,
    };
    match fields.get("config")? {
        Some(node) if typed.is_some() => {
            Err(node.error("a filter may not have both config and typed_config"))
        }
        Some(node) => typed::legacy_config(name, &node, notes),
        None => Ok(typed),
    }
}

fn network_filter(node: &Node<'_>, notes: &mut Notes) -> Result<Filter, DumpError> {
    let mut fields = node.object("Filter")?;
    let name = match fields.get("name")? {
        Some(node) => typed::v3_name(node.str()?, notes),
        None => String::new(),
    };
    let config = filter_config(&name, &mut fields, notes)?;
    if fields.get("config_discovery")?.is_some() {
        notes.add(format!(
            "filter {name}: config_discovery (ECDS) not converted"
        ));
    }
    fields.finish(notes);
    Ok(Filter {
        name,
        config_type: config.map(filter::ConfigType::TypedConfig),
    })
}

fn listener_filter(node: &Node<'_>, notes: &mut Notes) -> Result<ListenerFilter, DumpError> {
    let mut fields = node.object("ListenerFilter")?;
    let name = match fields.get("name")? {
        Some(node) => typed::v3_name(node.str()?, notes),
        None => String::new(),
    };
    let config = filter_config(&name, &mut fields, notes)?;
    if fields.get("config_discovery")?.is_some() {
        notes.add(format!(
            "listener filter {name}: config_discovery (ECDS) not converted"
        ));
    }
    let filter_disabled = match fields.get("filter_disabled")? {
        Some(node) => Some(predicate(&node, notes)?),
        None => None,
    };
    fields.finish(notes);
    Ok(ListenerFilter {
        name,
        filter_disabled,
        config_type: config.map(listener_filter::ConfigType::TypedConfig),
    })
}

fn predicate(
    node: &Node<'_>,
    notes: &mut Notes,
) -> Result<ListenerFilterChainMatchPredicate, DumpError> {
    let mut fields = node.object("ListenerFilterChainMatchPredicate")?;
    let mut rules = Vec::new();
    for (name, make) in [
        ("or_match", Rule::OrMatch as fn(MatchSet) -> Rule),
        ("and_match", Rule::AndMatch),
    ] {
        if let Some(node) = fields.get(name)? {
            let mut set_fields = node.object("MatchSet")?;
            let rules_node = set_fields.require("rules")?;
            let set: Result<Vec<_>, _> = rules_node
                .array()?
                .iter()
                .map(|n| predicate(n, notes))
                .collect();
            set_fields.finish(notes);
            rules.push((node, make(MatchSet { rules: set? })));
        }
    }
    if let Some(node) = fields.get("not_match")? {
        let inner = predicate(&node, notes)?;
        rules.push((node, Rule::NotMatch(Box::new(inner))));
    }
    if let Some(node) = fields.get("any_match")? {
        let any = node.bool()?;
        rules.push((node, Rule::AnyMatch(any)));
    }
    if let Some(node) = fields.get("destination_port_range")? {
        let mut range_fields = node.object("Int32Range")?;
        let mut range = Int32Range::default();
        if let Some(node) = range_fields.get("start")? {
            range.start = node.i32()?;
        }
        if let Some(node) = range_fields.get("end")? {
            range.end = node.i32()?;
        }
        range_fields.finish(notes);
        rules.push((node, Rule::DestinationPortRange(range)));
    }
    if rules.len() > 1 {
        return Err(rules[1]
            .0
            .error("a ListenerFilterChainMatchPredicate takes only one rule"));
    }
    fields.finish(notes);
    Ok(ListenerFilterChainMatchPredicate {
        rule: rules.pop().map(|(_, rule)| rule),
    })
}

fn transport_socket(node: &Node<'_>, notes: &mut Notes) -> Result<TransportSocket, DumpError> {
    let mut fields = node.object("TransportSocket")?;
    let name = match fields.get("name")? {
        Some(node) => typed::v3_name(node.str()?, notes),
        None => String::new(),
    };
    let mut socket = TransportSocket {
        name,
        config_type: None,
    };
    if let Some(node) = fields.get("typed_config")? {
        socket.config_type = Some(transport_socket::ConfigType::TypedConfig(typed::any(
            &node, notes,
        )?));
    }
    if let Some(node) = fields.get("config")? {
        if socket.config_type.is_some() {
            return Err(node.error("a transport socket may not have both config and typed_config"));
        }
        if socket.name == "envoy.transport_sockets.tls" {
            let context = tls::downstream_tls_context(node.object("DownstreamTlsContext")?, notes)?;
            socket.config_type = Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url: DownstreamTlsContext::type_url(),
                value: context.encode_to_vec(),
            }));
            notes.add("v2 config of transport socket envoy.transport_sockets.tls converted to typed_config");
        } else {
            notes.add(format!(
                "v2 config of transport socket {} dropped",
                socket.name
            ));
        }
    }
    fields.finish(notes);
    Ok(socket)
}
