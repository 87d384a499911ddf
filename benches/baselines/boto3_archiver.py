#!/usr/bin/env python3
"""A correct KVS-to-S3 archiver in Python, as a careful user would write it with boto3:
the baseline (e) of benches/side-by-side.

ListFragments over the range (all pages), sorted and de-duplicated; chunks of at most
200 fragments and 99 MB of listed size that never cross a 10-minute window; each chunk's
GetClip range is [first fragment start, last fragment start]; GetClip paced under the
per-stream media quota (500 fragments/s) with throttled calls retried; the clip body
streamed into upload_fileobj (multipart, boto3's default checksum).
"""

import argparse
import datetime as dt
import time

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

MAX_FRAGMENTS = 200
MAX_BYTES = 99_000_000
WINDOW_MS = 600_000
MEDIA_POINTS_PER_SEC = 500.0


def ts(ms):
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


def list_fragments(archived, stream, start_ms, end_ms):
    fragments = {}
    kwargs = {
        "StreamName": stream,
        "MaxResults": 1000,
        "FragmentSelector": {
            "FragmentSelectorType": "SERVER_TIMESTAMP",
            "TimestampRange": {"StartTimestamp": ts(start_ms), "EndTimestamp": ts(end_ms)},
        },
    }
    while True:
        try:
            page = archived.list_fragments(**kwargs)
        except ClientError as e:
            if e.response["Error"]["Code"] == "ClientLimitExceededException":
                time.sleep(0.2)
                continue
            raise
        for f in page["Fragments"]:
            at = int(f["ServerTimestamp"].timestamp() * 1000)
            fragments[f["FragmentNumber"]] = (at, f["FragmentNumber"], f["FragmentSizeInBytes"])
        token = page.get("NextToken")
        if not token:
            break
        kwargs = {"StreamName": stream, "MaxResults": 1000, "NextToken": token}
    return sorted(fragments.values(), key=lambda f: (f[0], len(f[1]), f[1]))


def chunks_of(fragments):
    chunk = []
    size = 0
    for f in fragments:
        if chunk and (
            len(chunk) == MAX_FRAGMENTS
            or size + f[2] > MAX_BYTES
            or f[0] // WINDOW_MS != chunk[0][0] // WINDOW_MS
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(f)
        size += f[2]
    if chunk:
        yield chunk


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kvs", required=True)
    p.add_argument("--s3", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--start-ms", type=int, required=True)
    p.add_argument("--end-ms", type=int, required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True)
    a = p.parse_args()

    kv = boto3.client("kinesisvideo", endpoint_url=a.kvs)
    endpoint = kv.get_data_endpoint(StreamName=a.stream, APIName="GET_CLIP")["DataEndpoint"]
    archived = boto3.client("kinesis-video-archived-media", endpoint_url=endpoint)
    # Unsigned payloads, as kvs-archiver runs here: over plain http botocore would
    # otherwise SHA-256 every byte, which the comparison should not charge it for.
    s3 = boto3.client("s3", endpoint_url=a.s3,
                      config=Config(s3={"addressing_style": "path",
                                        "payload_signing_enabled": False}))
    transfer = TransferConfig(multipart_chunksize=8 * 1024 * 1024, max_concurrency=4)

    tokens, at = MEDIA_POINTS_PER_SEC, time.monotonic()
    for chunk in chunks_of(list_fragments(archived, a.stream, a.start_ms, a.end_ms)):
        first, last = chunk[0][0], chunk[-1][0]
        while True:
            now = time.monotonic()
            tokens = min(MEDIA_POINTS_PER_SEC, tokens + (now - at) * MEDIA_POINTS_PER_SEC)
            at = now
            need = min(len(chunk), MEDIA_POINTS_PER_SEC)
            if tokens < need:
                time.sleep((need - tokens) / MEDIA_POINTS_PER_SEC)
                continue
            tokens -= len(chunk)
            try:
                clip = archived.get_clip(
                    StreamName=a.stream,
                    ClipFragmentSelector={
                        "FragmentSelectorType": "SERVER_TIMESTAMP",
                        "TimestampRange": {"StartTimestamp": ts(first), "EndTimestamp": ts(last)},
                    },
                )
                break
            except ClientError as e:
                if e.response["Error"]["Code"] != "ClientLimitExceededException":
                    raise
                time.sleep(0.2)
        s3.upload_fileobj(clip["Payload"], a.bucket, f"{a.prefix}/{first}-{last}.mp4", Config=transfer)


if __name__ == "__main__":
    main()
