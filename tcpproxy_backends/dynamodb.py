"""DynamoDB backend: one item per mapping, in the original tool's table.

Table (default ``classic-proxy``):

    proxy_name           S  hash key    the --proxy name
    proxy_configuration  S  range key   "LPORT:HOST:RPORT", or "LISTEN_IP:LPORT:HOST:RPORT"
                                        ("[::1]:8002:db:5432") for a listen address
                                        of its own instead of --listen-address
    allow                   optional    list (L or SS) or comma string (S) of CIDRs
    max_connections      N  optional    per-mapping connection limit (0: none)
    upstream_tls         BOOL optional  TLS to the upstream (or S "true"/"false")
    upstream_ca, upstream_sni, upstream_cert, upstream_key, tls_cert, tls_key
                         S  optional    the other TLS settings (tcpproxy.TLS_FIELDS)
    send_proxy           S  optional    PROXY protocol header to the upstream: v1 or v2
    accept_proxy    BOOL/S  optional    clients start with a PROXY header (true/false)
    dns_family           S  optional    auto, ipv4, ipv6, prefer-ipv4 or prefer-ipv6
                                        (default: the proxy's --dns-family)

Every poll Queries the items of ``proxy_name = --proxy`` (never a Scan) and
follows LastEvaluatedKey to the end, so any number of items apply.  Region and
credentials come from the standard AWS chain (``--region`` overrides it); the
endpoint from the standard variables ``AWS_ENDPOINT_URL_DYNAMODB`` or
``AWS_ENDPOINT_URL``, which botocore reads itself, so a local endpoint such as
``moto_server`` can stand in for AWS.

``cli(argv)`` is the operator helper behind ``tcpproxy dynamodb
create-table|put|delete|list``.
"""

import argparse
import logging
import sys

import tcpproxy
from tcpproxy import (
    DNS_FAMILIES,
    TLS_FIELDS,
    BackendError,
    ConfigError,
    Mapping,
    check_dns_family,
    check_flag,
    check_limit,
    check_proxy_version,
    parse_allow,
)

from .aws import CONNECT_TIMEOUT, READ_TIMEOUT, aws_reason, import_boto3, make_client

__all__ = ["Backend", "cli", "DEFAULT_TABLE", "make_client", "CONNECT_TIMEOUT", "READ_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_TABLE = "classic-proxy"
MAX_ITEMS = 10000           # a proxy's items in one poll at most
MAX_BYTES = 16 * 1024 * 1024   # the Query answers' bytes in one poll at most
HASH_KEY = "proxy_name"
RANGE_KEY = "proxy_configuration"

def _plain(value):
    """Turn a DynamoDB AttributeValue ({"S": ...}, {"L": [...]}, ...) into Python."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("unexpected attribute value %r" % (value,))
    (kind, data), = value.items()
    if kind in ("S", "SS", "N", "NS", "BOOL"):
        return data
    if kind == "L":
        return [_plain(item) for item in data]
    if kind == "NULL":
        return None
    raise ValueError("unsupported attribute type %s" % kind)


def _item_mapping(item):
    """Return the Mapping of one Query item; ValueError/ConfigError if it is bad."""
    spec = item.get(RANGE_KEY)
    if not isinstance(spec, dict) or not isinstance(spec.get("S"), str):
        raise ValueError("%s is missing or not a string" % RANGE_KEY)  # noqa: TRY004 - a bad item
    options = {}
    if "allow" in item:
        allow = item["allow"]
        kind = next(iter(allow)) if isinstance(allow, dict) and len(allow) == 1 else None
        if kind not in ("S", "SS", "L", "NULL"):
            raise ValueError("allow must be a list or a comma separated string of CIDRs")
        allow = _plain(allow)            # given: NULL or empty is an error, not "anyone"
        options["allow"] = parse_allow("" if allow is None else allow, "allow")
    if "max_connections" in item:
        maximum = item["max_connections"]
        kind = next(iter(maximum)) if isinstance(maximum, dict) and len(maximum) == 1 else None
        if kind not in ("N", "S", "NULL"):
            raise ValueError("max_connections must be a number")
        maximum = check_limit(_plain(maximum))
        if maximum:
            options["max_connections"] = maximum
    for name in TLS_FIELDS:
        if name in item:
            value = item[name]
            if not isinstance(value, dict) or next(iter(value), None) not in ("S", "BOOL", "NULL"):
                raise ValueError("%s must be a string%s" % (
                    name, " or a boolean" if name == "upstream_tls" else ""))
            options[name] = _plain(value)
    if "send_proxy" in item:
        value = item["send_proxy"]
        if not isinstance(value, dict) or set(value) - {"S", "NULL"} or len(value) != 1:
            raise ValueError("send_proxy must be the string v1 or v2")
        options["send_proxy"] = check_proxy_version(_plain(value))
    if "accept_proxy" in item:
        value = item["accept_proxy"]
        if not isinstance(value, dict) or set(value) - {"BOOL", "S", "NULL"} or len(value) != 1:
            raise ValueError("accept_proxy must be a boolean (or the string true or false)")
        options["accept_proxy"] = bool(check_flag(value.get("BOOL", value.get("S")),
                                                      "accept_proxy"))
    if "dns_family" in item:
        value = item["dns_family"]
        if not isinstance(value, dict) or set(value) - {"S", "NULL"} or len(value) != 1:
            raise ValueError("dns_family must be a string (%s)" % ", ".join(DNS_FAMILIES))
        options["dns_family"] = check_dns_family(_plain(value))
    return Mapping.parse(spec["S"], **options)


def _label(item):
    value = item.get(RANGE_KEY)
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    return "item %s=%r" % (RANGE_KEY, value)


def _spec_key(item):
    """The mapping key (see tcpproxy.Mapping.key: the listen port, or
    "IP:PORT") an item's configuration names, if it can be told."""
    value = item.get(RANGE_KEY)
    text = value.get("S") if isinstance(value, dict) else None
    return tcpproxy.spec_key(text) if isinstance(text, str) else None


def _check_items(items, default_host=None):
    """(mappings, problems, held) from Query items.  An invalid item, or two
    items that cannot both listen (one listen address and port, or a
    wildcard and another address on one port: tcpproxy.listen_conflict),
    puts their keys in *held* (the poller keeps what is in force there;
    None: the key cannot be told, nothing is removed) and the reason in
    *problems* ({item label: reason}).  *default_host*: the proxy's
    --listen-address, when known."""
    by_key, problems, held = {}, {}, set()
    for item in items:
        label = _label(item)
        try:
            mapping = _item_mapping(item)
        except (ValueError, TypeError, AttributeError, tcpproxy.ProxyError) as exc:
            problems[label] = "invalid: %s; keeping what is in force on its port" % exc
            held.add(_spec_key(item))
            continue
        by_key.setdefault(mapping.key, []).append((label, mapping))
    for key, entries in by_key.items():
        if len(entries) > 1:
            for label, _ in entries:
                problems[label] = ("listen %s %s has %d items (%s): keeping what is in "
                                   "force; delete all but one, or use put --replace"
                                   % ("port" if isinstance(key, int) else "address", key,
                                      len(entries), ", ".join(l for l, _ in entries)))
            held.add(key)
    by_port = {}                         # listen port -> [(label, mapping)], one per key
    for entries in by_key.values():
        if len(entries) == 1:
            by_port.setdefault(entries[0][1].listen_port, []).append(entries[0])
    for single in by_port.values():      # a wildcard and another address on one port
        for i, (label, mapping) in enumerate(single):
            for other_label, other in single[i + 1:]:
                reason = tcpproxy.listen_conflict(mapping, other, default_host)
                if reason:
                    for one, two in ((label, other_label), (other_label, label)):
                        problems[one] = ("%s (with %s): keeping what is in force on both"
                                         % (reason, two))
                    held.update((mapping.key, other.key))
    mappings = sorted((entries[0][1] for key, entries in by_key.items() if key not in held),
                      key=lambda m: (m.listen_port, m.listen_host or ""))
    return mappings, problems, held


class Backend:
    """Mappings from the DynamoDB items whose hash key is the --proxy name.

    Methods for the caller: fetch(), describe().  Options read: proxy
    (required), dynamodb (table, default classic-proxy), region,
    listen_address (the proxy's default listen address: items that would
    conflict with it are held too).
    """

    name = "dynamodb"
    interval = None
    page_limit = None       # Query Limit per page; None lets DynamoDB fill 1 MB pages

    def __init__(self, options, client=None):
        self.proxy = getattr(options, "proxy", None)
        self.table = getattr(options, "dynamodb", None) or DEFAULT_TABLE
        self.region = getattr(options, "region", None)
        self.listen_address = getattr(options, "listen_address", None)
        if not self.proxy:
            raise ConfigError("no proxy name: --backend dynamodb needs --proxy NAME")
        self._boto3, self._botocore = import_boto3("dynamodb")
        self.client = client if client is not None else make_client("dynamodb", self.region)
        self.items = None
        self.pages = None
        self.problems = {}          # item label -> reason, for the poller
        self.held = set()           # listen ports whose mapping in force stays

    def _query_pages(self):
        request = {
            "TableName": self.table,
            "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": dict({"#p": HASH_KEY, "#c": RANGE_KEY,
                                              "#a": "allow", "#m": "max_connections",
                                              "#s": "send_proxy", "#x": "accept_proxy",
                                              "#f": "dns_family"},
                                             **{"#t%d" % i: name for i, name in
                                                enumerate(TLS_FIELDS)}),
            "ExpressionAttributeValues": {":p": {"S": self.proxy}},
            "ProjectionExpression": "#c, #a, #m, #s, #x, #f, " + ", ".join(
                "#t%d" % i for i in range(len(TLS_FIELDS))),
            "ConsistentRead": True,
        }
        if self.page_limit:
            request["Limit"] = self.page_limit
        while True:
            response = self.client.query(**request)
            yield response
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    def fetch(self):
        """Query every page for --proxy; return the mappings of the good items."""
        items = []
        pages = size = 0
        try:
            for response in self._query_pages():
                pages += 1
                page = response.get("Items")
                if not isinstance(page, list):
                    raise BackendError("DynamoDB query of table %s: malformed answer "
                                       "(no Items list)" % self.table)
                items.extend(page)
                headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                size += int(headers.get("content-length") or 0)
                if len(items) > MAX_ITEMS or size > MAX_BYTES:
                    raise tcpproxy.ConfigRejected(
                        "DynamoDB table %s has more than %d items or %d bytes for proxy %r "
                        "(%d items, %d bytes so far): keeping the configuration in force"
                        % (self.table, MAX_ITEMS, MAX_BYTES, self.proxy, len(items), size))
        except BackendError:
            raise
        except (self._botocore.exceptions.BotoCoreError,
                self._botocore.exceptions.ClientError) as exc:
            raise BackendError("DynamoDB query of table %s for proxy %r failed: %s"
                               % (self.table, self.proxy, aws_reason(exc))) from exc
        mappings, self.problems, self.held = _check_items(items, self.listen_address)
        self.items, self.pages = len(items), pages
        log.debug("DynamoDB table %s proxy %r: %d items in %d pages, %d mappings",
                  self.table, self.proxy, len(items), pages, len(mappings))
        return mappings

    def describe(self):
        info = {"table": self.table, "proxy": self.proxy,
                "region": self.client.meta.region_name,
                "endpoint": self.client.meta.endpoint_url}
        if self.items is not None:
            info["items"] = self.items
        return info


# Operator helper ###########################################################

def _parser():
    parser = argparse.ArgumentParser(
        prog="tcpproxy dynamodb",
        description="Create the table and add, remove or list a proxy's mappings "
                    "(items of the DynamoDB backend).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p, proxy=True):
        if proxy:
            p.add_argument("--proxy", required=True, help="proxy name (hash key)")
        p.add_argument("--table", "--dynamodb", dest="table", default=DEFAULT_TABLE,
                       help="table name (default %(default)s)")
        p.add_argument("--region", help="AWS region (default: the standard AWS chain)")

    p = sub.add_parser("create-table", help="create the table (on-demand capacity) "
                       "and wait until it is ACTIVE")
    common(p, proxy=False)
    p = sub.add_parser("put", help="add mappings [LISTEN_IP:]LPORT:HOST:RPORT")
    common(p)
    p.add_argument("--allow", action="append", metavar="CIDR",
                   help="per-mapping client allow list (repeatable)")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="per-mapping connection limit")
    p.add_argument("--send-proxy", choices=("v1", "v2"),
                   help="send a PROXY protocol header to the upstream")
    p.add_argument("--accept-proxy", action="store_true",
                   help="clients start with a PROXY protocol header (a load balancer)")
    p.add_argument("--dns-family", choices=DNS_FAMILIES,
                   help="address records to use for the target (default: the proxy's "
                        "--dns-family)")
    p.add_argument("--replace", action="store_true",
                   help="in the same transaction delete the proxy's other items "
                        "on the same listen address and port (a blue-green switch)")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p = sub.add_parser("delete", help="remove mappings, given as [LISTEN_IP:]LPORT:HOST:RPORT, "
                       "a bare LPORT for every item on that port or LISTEN_IP:LPORT for "
                       "the item on that address")
    common(p)
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p = sub.add_parser("list", help="print the proxy's items, one a line")
    common(p)
    return parser


def _write(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _all_items(client, table, proxy):
    request = {"TableName": table, "KeyConditionExpression": "#p = :p",
               "ExpressionAttributeNames": {"#p": HASH_KEY},
               "ExpressionAttributeValues": {":p": {"S": proxy}},
               "ConsistentRead": True}
    items = []
    while True:
        response = client.query(**request)
        items.extend(response.get("Items", []))
        if not response.get("LastEvaluatedKey"):
            return items
        request["ExclusiveStartKey"] = response["LastEvaluatedKey"]


def _key(proxy, configuration):
    return {HASH_KEY: {"S": proxy}, RANGE_KEY: {"S": configuration}}


def _create_table(client, args):
    schema = [{"AttributeName": HASH_KEY, "KeyType": "HASH"},
              {"AttributeName": RANGE_KEY, "KeyType": "RANGE"}]
    try:
        client.create_table(
            TableName=args.table, KeySchema=schema, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": HASH_KEY, "AttributeType": "S"},
                                  {"AttributeName": RANGE_KEY, "AttributeType": "S"}])
        log.info("creating table %s", args.table)
    except client.exceptions.ResourceInUseException:
        found = client.describe_table(TableName=args.table)["Table"]["KeySchema"]
        if sorted((k["AttributeName"], k["KeyType"]) for k in found) != \
                sorted((k["AttributeName"], k["KeyType"]) for k in schema):
            log.error("table %s exists with another key schema: %s", args.table, found)
            return 1
        log.info("table %s already exists", args.table)
    client.get_waiter("table_exists").wait(
        TableName=args.table, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
    _write("table %s is ACTIVE" % args.table)
    return 0


def _put(client, args):
    options = {}
    try:
        allow = parse_allow(args.allow, "--allow")
        maximum = check_limit(args.max_connections, "--max-connections")
        mappings = [Mapping.parse(spec, dns_family=args.dns_family) for spec in args.specs]
    except (ValueError, tcpproxy.ProxyError) as exc:
        log.error("%s", exc)
        return 2
    try:
        tcpproxy.check_unique_ports([(repr(s), m) for s, m in zip(args.specs, mappings)])
    except tcpproxy.ConfigError as exc:
        log.error("%s", exc)
        return 2
    keys = [m.key for m in mappings]
    if allow:
        options["allow"] = {"L": [{"S": str(a)} for a in allow]}
    if maximum:
        options["max_connections"] = {"N": str(maximum)}
    if args.send_proxy:
        options["send_proxy"] = {"S": args.send_proxy}
    if args.accept_proxy:
        options["accept_proxy"] = {"BOOL": True}
    if args.dns_family:
        options["dns_family"] = {"S": args.dns_family}
    actions = []
    for mapping in mappings:
        item = dict(_key(args.proxy, mapping.spec), **options)
        actions.append({"Put": {"TableName": args.table, "Item": item}})
    wanted = {m.spec for m in mappings}
    others = []
    for item in _all_items(client, args.table, args.proxy):
        configuration = item[RANGE_KEY]["S"]
        if _spec_key(item) in keys and configuration not in wanted:
            others.append(configuration)
    if others and not args.replace:
        log.error("tcpproxy dynamodb put: listen port already has another item (%s): "
                  "the proxy would keep what is in force there; add --replace to switch "
                  "it in one transaction", ", ".join(others))
        return 1
    for configuration in others:
        actions.append({"Delete": {"TableName": args.table,
                                   "Key": _key(args.proxy, configuration)}})
    if len(actions) == 1:
        client.put_item(**actions[0]["Put"])
    else:
        for start in range(0, len(actions), 100):
            if start:
                log.warning("more than 100 changes: not one transaction")
            client.transact_write_items(TransactItems=actions[start:start + 100])
    for action in actions:
        if "Put" in action:
            _write("put %s" % action["Put"]["Item"][RANGE_KEY]["S"])
        else:
            _write("deleted %s" % action["Delete"]["Key"][RANGE_KEY]["S"])
    return 0


def _delete(client, args):
    ports, keys, wanted = set(), set(), []
    for spec in args.specs:
        if spec.strip().isdigit():
            ports.add(int(spec))
            continue
        try:                             # LISTEN_IP:LPORT: the item on that address
            host, port = tcpproxy.parse_listen(spec)
            keys.add(tcpproxy.mapping_key(host, port))
            continue
        except tcpproxy.ProxyError:
            pass
        try:
            wanted.append(Mapping.parse(spec))
        except tcpproxy.ProxyError:
            wanted.append(spec.strip())
    found = []
    for item in _all_items(client, args.table, args.proxy):
        configuration = item[RANGE_KEY]["S"]
        try:
            mapping = Mapping.parse(configuration)
        except tcpproxy.ProxyError:
            mapping = None
        if configuration in wanted or (mapping is not None and (
                mapping.listen_port in ports or mapping.key in keys or any(
                    isinstance(w, Mapping) and (w.key, w.host, w.port)
                    == (mapping.key, mapping.host, mapping.port)
                    for w in wanted))):
            found.append(configuration)
    for configuration in found:
        client.delete_item(TableName=args.table, Key=_key(args.proxy, configuration))
        _write("deleted %s" % configuration)
    if not found:
        log.error("no item of proxy %r in table %s matches %s",
                  args.proxy, args.table, " ".join(args.specs))
        return 1
    return 0


def _list(client, args):
    for item in _all_items(client, args.table, args.proxy):
        line = [item[RANGE_KEY]["S"]]
        try:
            if "allow" in item:
                line.append("allow=" + ",".join(map(str, parse_allow(_plain(item["allow"])))))
            if "max_connections" in item:
                line.append("max_connections=%s" % _plain(item["max_connections"]))
            mapping = _item_mapping(item) if {"send_proxy", "accept_proxy",
                                              "dns_family"} & set(item) else None
            if mapping is not None and mapping.send_proxy:
                line.append("send_proxy=" + mapping.send_proxy)
            if mapping is not None and mapping.accept_proxy:
                line.append("accept_proxy=true")
            if mapping is not None and mapping.dns_family:
                line.append("dns_family=" + mapping.dns_family)
        except (ValueError, tcpproxy.ProxyError) as exc:
            line.append("(invalid: %s)" % exc)
        _write(" ".join(line))
    return 0


def cli(argv=None, client=None):
    """``tcpproxy dynamodb COMMAND ...``: returns an exit code (0 ok, 1 failed, 2 usage).

    client: an already built boto3 DynamoDB client (tests); by default one is
    made from --region and the standard AWS chain.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    commands = {"create-table": _create_table, "put": _put, "delete": _delete,
                "list": _list}
    try:
        _, botocore = import_boto3("dynamodb")
        if client is None:
            client = make_client("dynamodb", args.region)
        return commands[args.command](client, args)
    except tcpproxy.ProxyError as exc:
        log.error("%s", exc)
        return 1
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.error("tcpproxy dynamodb %s (table %s) failed: %s",
                  args.command, args.table, aws_reason(exc))
        return 1
