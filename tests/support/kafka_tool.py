"""Reads a Kafka topic back for the end-to-end tests with a client that is not edgeship's
(kafka-python), and answers in JSON on stdout.

  kafka_tool.py BOOTSTRAP consume TOPIC [--sasl MECHANISM USER PASSWORD] [--ca CA_FILE]
      every record of every partition, from the start to the end offsets read first:
      [{"partition", "offset", "key", "value_b64", "headers": {name: text}, "timestamp"}]
  kafka_tool.py BOOTSTRAP offsets TOPIC
      how many records the topic holds: the sum of its partitions' end offsets
  kafka_tool.py - partition KEY PARTITIONS
      the partition kafka-python's default partitioner (murmur2) gives KEY
"""

import base64
import json
import sys


def partition(key, partitions):
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def consume(bootstrap, topic, options):
    from kafka import KafkaConsumer, TopicPartition

    settings = dict(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=16 << 20,
        request_timeout_ms=30_000,
    )
    if "--sasl" in options:
        at = options.index("--sasl")
        mechanism, user, password = options[at + 1 : at + 4]
        settings.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=user,
            sasl_plain_password=password,
        )
        settings["security_protocol"] = "SASL_PLAINTEXT"
    if "--ca" in options:
        ca = options[options.index("--ca") + 1]
        settings["ssl_cafile"] = ca
        settings["ssl_check_hostname"] = True
        settings["security_protocol"] = (
            "SASL_SSL" if "--sasl" in options else "SSL"
        )
    consumer = KafkaConsumer(**settings)
    partitions = consumer.partitions_for_topic(topic)
    if partitions is None:
        raise SystemExit(f"topic {topic} not found")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    out = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for tp, records in consumer.poll(timeout_ms=2_000, max_records=100_000).items():
            for r in records:
                if r.offset >= end[tp]:
                    continue
                out.append(
                    {
                        "partition": tp.partition,
                        "offset": r.offset,
                        "key": None if r.key is None else r.key.decode(),
                        "value_b64": base64.b64encode(r.value or b"").decode(),
                        "headers": {k: v.decode() for k, v in (r.headers or [])},
                        "timestamp": r.timestamp,
                    }
                )
    consumer.close()
    return {"partitions": len(tps), "records": out}


def offsets(bootstrap, topic):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    total = sum(consumer.end_offsets(tps).values())
    consumer.close()
    return total


def main():
    bootstrap, command, *rest = sys.argv[1:]
    if command == "consume":
        answer = consume(bootstrap, rest[0], rest[1:])
    elif command == "offsets":
        answer = offsets(bootstrap, rest[0])
    elif command == "partition":
        answer = partition(rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown command {command}")
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
