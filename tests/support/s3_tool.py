"""S3, Firehose and DuckDB from the tests' side, with clients that are not edgeship's: boto3 (installed
with moto) for the bucket, DuckDB for reading the objects the way Athena would.

    s3_tool.py ENDPOINT mkbucket BUCKET
    s3_tool.py ENDPOINT fetch BUCKET DIR   objects to DIR/<key>; prints {"keys": [...]}
    s3_tool.py ENDPOINT uploads BUCKET     prints {"uploads": [{"key", "parts"}...]}, the
                                           incomplete multipart uploads
    s3_tool.py ENDPOINT mkfirehose NAME BUCKET   a Firehose delivery stream (moto) into BUCKET
    s3_tool.py ENDPOINT abort BUCKET KEY UPLOAD_ID   aborts that multipart upload
    s3_tool.py ENDPOINT heads BUCKET       prints {"KEY": {"sse", "kms_key", "type"}} per object
    s3_tool.py - duckdb DIR GLOB           prints {"rows", "ids", "by_hour": {"dt/hr": n}} of
                                           read_json_auto(DIR/GLOB, hive_partitioning = true)
    s3_tool.py - parquet DIR               the same of the Parquet files under DIR (pyarrow,
                                           hive partitioning), and "records": [[topic,
                                           payload or payload_base64], ...]
"""

import json
import os
import sys


def client(endpoint):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "AKIAEDGESHIPTEST"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "edgeship-test-secret"),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def uploads(s3, bucket):
    out = []
    for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        parts = s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        out.append({"key": u["Key"], "parts": len(parts.get("Parts", []))})
    return out


def main(argv):
    endpoint, command = argv[1], argv[2]
    if command == "mkbucket":
        client(endpoint).create_bucket(Bucket=argv[3])
        print("{}")
    elif command == "fetch":
        s3, bucket, folder = client(endpoint), argv[3], argv[4]
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                keys.append(o["Key"])
                path = os.path.join(folder, o["Key"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                s3.download_file(bucket, o["Key"], path)
        print(json.dumps({"keys": keys}))
    elif command == "heads":
        s3, bucket, out = client(endpoint), argv[3], {}
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            h = s3.head_object(Bucket=bucket, Key=o["Key"])
            out[o["Key"]] = {
                "sse": h.get("ServerSideEncryption"),
                "kms_key": h.get("SSEKMSKeyId"),
                "type": h.get("ContentType"),
            }
        print(json.dumps(out))
    elif command == "mkfirehose":
        import boto3

        boto3.client(
            "firehose",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="AKIAEDGESHIPTEST",
            aws_secret_access_key="edgeship-test-secret",
        ).create_delivery_stream(
            DeliveryStreamName=argv[3],
            DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": "arn:aws:iam::123456789012:role/firehose",
                "BucketARN": f"arn:aws:s3:::{argv[4]}",
                "Prefix": "firehose/",
            },
        )
        print("{}")
    elif command == "abort":
        client(endpoint).abort_multipart_upload(Bucket=argv[3], Key=argv[4], UploadId=argv[5])
        print("{}")
    elif command == "uploads":
        print(json.dumps({"uploads": uploads(client(endpoint), argv[3])}))
    elif command == "duckdb":
        import duckdb

        folder, glob = argv[3], argv[4]
        pattern = os.path.join(folder, glob)
        con = duckdb.connect()
        rows, ids = con.execute(
            "SELECT count(*), count(DISTINCT id) FROM read_json_auto(?, hive_partitioning = true)",
            [pattern],
        ).fetchone()
        by_hour = {
            f"{dt}/{int(hr):02d}": n
            for dt, hr, n in con.execute(
                "SELECT CAST(dt AS VARCHAR), hr, count(*) FROM read_json_auto(?, hive_partitioning = true) GROUP BY ALL",
                [pattern],
            ).fetchall()
        }
        print(json.dumps({"rows": rows, "ids": ids, "by_hour": by_hour}))
    elif command == "parquet":
        import pyarrow.dataset as ds

        table = ds.dataset(argv[3], format="parquet", partitioning="hive").to_table()
        by_hour = {}
        for dt, hr in zip(table.column("dt").to_pylist(), table.column("hr").to_pylist()):
            key = f"{dt}/{int(hr):02d}"
            by_hour[key] = by_hour.get(key, 0) + 1
        records = [
            [t, p if p is not None else b]
            for t, p, b in zip(
                table.column("topic").to_pylist(),
                table.column("payload").to_pylist(),
                table.column("payload_base64").to_pylist(),
            )
        ]
        ids = table.column("id").to_pylist()
        print(json.dumps({"rows": table.num_rows, "ids": len(set(ids)), "by_hour": by_hour, "records": records}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
