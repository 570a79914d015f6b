//! MQTT packets on the wire, for both protocol versions, on rumqttc's codec
//! (`rumqttc::mqttbytes::v4` and `rumqttc::v5::mqttbytes::v5`): the session's outbound
//! packets encoded into one buffer, and inbound packets read from a buffer as far as the
//! session cares about them. A packet over the size limit is not decoded: [`Decoded::Oversize`]
//! says how many bytes to pass over, and, for a PUBLISH, its packet id once its header is in,
//! so it can be counted and acked without ever being held whole.
//!
//! It does no I/O and keeps no state.

use super::session::Outbound;
use crate::config::{BrokerConfig, MqttProtocol};
use bytes::{Buf, Bytes, BytesMut};

/// What a buffer's next packet is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decoded {
    ConnAck {
        session_present: bool,
        /// `Err` with the broker's reason if it refused the connection.
        accepted: Result<(), String>,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        granted: usize,
        refused: usize,
    },
    UnsubAck {
        pkid: u16,
    },
    PingResp,
    /// The broker disconnects us (MQTT 5 says why).
    Disconnect {
        reason: String,
    },
    /// A packet over `max_packet_bytes`: `skip` bytes (its whole frame) are to be passed
    /// over. For a PUBLISH, its topic, QoS and packet id (QoS 0: 0).
    Oversize {
        skip: u64,
        publish: Option<(String, u8, u16)>,
    },
    /// A packet the intake does not use (PUBACK of nothing it sent, and the like).
    Other,
}

/// A packet that cannot be read: the connection is given up.
#[derive(Debug, thiserror::Error)]
#[error("malformed MQTT packet from the broker: {0}")]
pub(crate) struct CodecError(String);

/// The fixed header: the first byte and the remaining length, if the buffer holds it.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, u64, usize)>, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut len: u64 = 0;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((byte1, len, i + 2)));
        }
    }
    if buf.len() >= 5 {
        return Err(CodecError("a remaining length of more than 4 bytes".into()));
    }
    Ok(None)
}

/// Reads the next packet from `buf` if it holds one whole (or, for a packet over
/// `max_bytes`, enough of its header), consuming it. `Ok(None)`: more bytes are needed.
pub(crate) fn decode(
    protocol: MqttProtocol,
    buf: &mut BytesMut,
    max_bytes: u64,
) -> Result<Option<Decoded>, CodecError> {
    let Some((byte1, remaining, header_len)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let frame = header_len as u64 + remaining;
    if frame > max_bytes {
        let publish = if byte1 >> 4 == 3 {
            let qos = (byte1 >> 1) & 0b11;
            // Topic (a length and its bytes), then, QoS 1 and 2, the packet id.
            let body = &buf[header_len..];
            if body.len() < 2 {
                return Ok(None);
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let id_len = if qos == 0 { 0 } else { 2 };
            if body.len() < 2 + topic_len + id_len {
                return Ok(None);
            }
            let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
            let at = 2 + topic_len;
            let pkid = if qos == 0 {
                0
            } else {
                u16::from_be_bytes([body[at], body[at + 1]])
            };
            Some((topic, qos, pkid))
        } else {
            None
        };
        return Ok(Some(Decoded::Oversize {
            skip: frame,
            publish,
        }));
    }
    if (buf.len() as u64) < frame {
        return Ok(None);
    }
    match protocol {
        MqttProtocol::V311 => decode_v4(buf),
        MqttProtocol::V5 => decode_v5(buf),
    }
    .map(Some)
}

fn decode_v4(buf: &mut BytesMut) -> Result<Decoded, CodecError> {
    use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
    let packet = Packet::read(buf, usize::MAX).map_err(|e| CodecError(format!("{e:?}")))?;
    Ok(match packet {
        Packet::ConnAck(a) => Decoded::ConnAck {
            session_present: a.session_present,
            accepted: match a.code {
                ConnectReturnCode::Success => Ok(()),
                code => Err(format!("{code:?}")),
            },
        },
        Packet::Publish(p) => Decoded::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        Packet::PubRel(r) => Decoded::PubRel { pkid: r.pkid },
        Packet::SubAck(a) => {
            let granted = a
                .return_codes
                .iter()
                .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
                .count();
            Decoded::SubAck {
                pkid: a.pkid,
                granted,
                refused: a.return_codes.len() - granted,
            }
        }
        Packet::UnsubAck(a) => Decoded::UnsubAck { pkid: a.pkid },
        Packet::PingResp => Decoded::PingResp,
        Packet::Disconnect => Decoded::Disconnect {
            reason: "the broker sent DISCONNECT".into(),
        },
        _ => Decoded::Other,
    })
}

fn decode_v5(buf: &mut BytesMut) -> Result<Decoded, CodecError> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, SubscribeReasonCode};
    let packet = Packet::read(buf, None).map_err(|e| CodecError(format!("{e:?}")))?;
    Ok(match packet {
        Packet::ConnAck(a) => Decoded::ConnAck {
            session_present: a.session_present,
            accepted: match a.code {
                ConnectReturnCode::Success => Ok(()),
                code => Err(format!(
                    "{code:?}{}",
                    a.properties
                        .and_then(|p| p.reason_string)
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )),
            },
        },
        Packet::Publish(p) => Decoded::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError("a topic that is not UTF-8".into()))?,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        Packet::PubRel(r) => Decoded::PubRel { pkid: r.pkid },
        Packet::SubAck(a) => {
            let granted = a
                .return_codes
                .iter()
                .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
                .count();
            Decoded::SubAck {
                pkid: a.pkid,
                granted,
                refused: a.return_codes.len() - granted,
            }
        }
        Packet::UnsubAck(a) => Decoded::UnsubAck { pkid: a.pkid },
        Packet::PingResp(_) => Decoded::PingResp,
        Packet::Disconnect(d) => Decoded::Disconnect {
            reason: format!(
                "{:?}{}",
                d.reason_code,
                d.properties
                    .and_then(|p| p.reason_string)
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        },
        _ => Decoded::Other,
    })
}

/// The CONNECT for `config`: a persistent session (MQTT 5: never expiring), the agent's
/// window announced as Receive Maximum, no topic aliases, its packet size limit.
pub(crate) fn encode_connect(config: &BrokerConfig, buf: &mut BytesMut) {
    let keep_alive = config.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
    match config.protocol {
        MqttProtocol::V311 => {
            use rumqttc::mqttbytes::v4::{Connect, Packet};
            let mut c = Connect::new(config.client_id.clone());
            c.keep_alive = keep_alive;
            c.clean_session = false;
            if let Some(user) = &config.username {
                c.set_login(user.clone(), config.password.clone().unwrap_or_default());
            }
            Packet::Connect(c)
                .write(buf, usize::MAX)
                .expect("a CONNECT encodes");
        }
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, Login, Packet};
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(u32::MAX);
            props.receive_maximum = Some(config.max_unacked.clamp(1, 65_535) as u16);
            props.max_packet_size = Some(config.max_packet_bytes.min(u64::from(u32::MAX)) as u32);
            props.topic_alias_max = Some(0);
            let login = config.username.as_ref().map(|u| Login {
                username: u.clone(),
                password: config.password.clone().unwrap_or_default(),
            });
            Packet::Connect(
                Connect {
                    keep_alive,
                    client_id: config.client_id.clone(),
                    clean_start: false,
                    properties: Some(props),
                },
                None,
                login,
            )
            .write(buf, None)
            .expect("a CONNECT encodes");
        }
    }
}

/// Appends `packet` to `buf`.
pub(crate) fn encode(protocol: MqttProtocol, packet: &Outbound, buf: &mut BytesMut) {
    match protocol {
        MqttProtocol::V311 => {
            use rumqttc::mqttbytes::v4::*;
            let p = match packet {
                Outbound::PubAck(id) => Packet::PubAck(PubAck::new(*id)),
                Outbound::PubRec(id) => Packet::PubRec(PubRec::new(*id)),
                Outbound::PubComp(id) => Packet::PubComp(PubComp::new(*id)),
                Outbound::PingReq => Packet::PingReq,
                Outbound::Disconnect => Packet::Disconnect,
                Outbound::Subscribe { pkid, filters } => Packet::Subscribe(Subscribe {
                    pkid: *pkid,
                    filters: filters
                        .iter()
                        .map(|(f, q)| SubscribeFilter::new(f.clone(), qos_v4(*q)))
                        .collect(),
                }),
                Outbound::Unsubscribe { pkid, filters } => Packet::Unsubscribe(Unsubscribe {
                    pkid: *pkid,
                    topics: filters.clone(),
                }),
            };
            p.write(buf, usize::MAX)
                .expect("an outbound packet encodes");
        }
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::*;
            let p = match packet {
                Outbound::PubAck(id) => Packet::PubAck(PubAck::new(*id, None)),
                Outbound::PubRec(id) => Packet::PubRec(PubRec::new(*id, None)),
                Outbound::PubComp(id) => Packet::PubComp(PubComp::new(*id, None)),
                Outbound::PingReq => Packet::PingReq(PingReq),
                Outbound::Disconnect => {
                    Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection))
                }
                Outbound::Subscribe { pkid, filters } => Packet::Subscribe(Subscribe {
                    pkid: *pkid,
                    filters: filters
                        .iter()
                        .map(|(f, q)| Filter::new(f.clone(), qos_v5(*q)))
                        .collect(),
                    properties: None,
                }),
                Outbound::Unsubscribe { pkid, filters } => Packet::Unsubscribe(Unsubscribe {
                    pkid: *pkid,
                    filters: filters.clone(),
                    properties: None,
                }),
            };
            p.write(buf, None).expect("an outbound packet encodes");
        }
    }
}

fn qos_v4(q: u8) -> rumqttc::mqttbytes::QoS {
    use rumqttc::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Passes over up to `n` bytes of `buf`; returns how many.
pub(crate) fn skip(buf: &mut BytesMut, n: u64) -> u64 {
    let k = (buf.len() as u64).min(n);
    buf.advance(k as usize);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_bytes(
        protocol: MqttProtocol,
        topic: &str,
        qos: u8,
        pkid: u16,
        payload: &[u8],
    ) -> BytesMut {
        let mut buf = BytesMut::new();
        match protocol {
            MqttProtocol::V311 => {
                let mut p =
                    rumqttc::mqttbytes::v4::Publish::new(topic, qos_v4(qos), payload.to_vec());
                p.pkid = pkid;
                rumqttc::mqttbytes::v4::Packet::Publish(p)
                    .write(&mut buf, usize::MAX)
                    .unwrap();
            }
            MqttProtocol::V5 => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    topic,
                    qos_v5(qos),
                    payload.to_vec(),
                    None,
                );
                p.pkid = pkid;
                rumqttc::v5::mqttbytes::v5::Packet::Publish(p)
                    .write(&mut buf, None)
                    .unwrap();
            }
        }
        buf
    }

    #[test]
    fn a_publish_is_read_whole_or_waited_for() {
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
            let full = publish_bytes(protocol, "devices/a/telemetry", 1, 42, b"{\"t\":1}");
            let mut part = BytesMut::from(&full[..full.len() - 1]);
            assert_eq!(decode(protocol, &mut part, 1 << 20).unwrap(), None);
            let mut whole = full.clone();
            whole.extend_from_slice(&full);
            for _ in 0..2 {
                assert_eq!(
                    decode(protocol, &mut whole, 1 << 20).unwrap(),
                    Some(Decoded::Publish {
                        topic: "devices/a/telemetry".into(),
                        payload: Bytes::from_static(b"{\"t\":1}"),
                        qos: 1,
                        pkid: 42
                    })
                );
            }
            assert!(whole.is_empty());
        }
    }

    #[test]
    fn an_oversize_publish_gives_its_id_from_the_header_alone() {
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
            let big = vec![7u8; 100_000];
            let full = publish_bytes(protocol, "devices/b/telemetry", 1, 9, &big);
            // Only the first 64 bytes have arrived: enough for the topic and the id.
            let mut head = BytesMut::from(&full[..64]);
            let got = decode(protocol, &mut head, 10_000).unwrap();
            assert_eq!(
                got,
                Some(Decoded::Oversize {
                    skip: full.len() as u64,
                    publish: Some(("devices/b/telemetry".into(), 1, 9))
                })
            );
            // The caller passes over the frame, then the next packet reads.
            let mut stream = full.clone();
            stream.extend_from_slice(&publish_bytes(protocol, "small", 1, 10, b"x"));
            let mut left = full.len() as u64;
            left -= skip(&mut stream, left);
            assert_eq!(left, 0);
            assert!(matches!(
                decode(protocol, &mut stream, 10_000).unwrap(),
                Some(Decoded::Publish { pkid: 10, .. })
            ));
        }
    }

    #[test]
    fn outbound_packets_encode_for_both_versions() {
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
            let mut buf = BytesMut::new();
            for p in [
                Outbound::PubAck(1),
                Outbound::PubRec(2),
                Outbound::PubComp(3),
                Outbound::PingReq,
                Outbound::Subscribe {
                    pkid: 4,
                    filters: vec![("devices/+/telemetry".into(), 1)],
                },
                Outbound::Unsubscribe {
                    pkid: 5,
                    filters: vec!["old/#".into()],
                },
            ] {
                encode(protocol, &p, &mut buf);
            }
            // PUBACK is four bytes in 3.1.1 and in 5 with reason Success and no properties.
            assert_eq!(&buf[..4], &[0x40, 0x02, 0x00, 0x01]);
        }
    }

    #[test]
    fn a_remaining_length_over_four_bytes_is_refused() {
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(decode(MqttProtocol::V311, &mut buf, u64::MAX).is_err());
    }
}
