"""tosi-resolve: resolve an image reference and write the plan (tosi-plan(5)) to stdout."""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .common import (
    add_credential_flags, add_workdir_flag, check_authfile, count_type, exit_status_epilog, new_parser,
    password_from_stdin, run, setup_logging,
)

if TYPE_CHECKING:
    from ..keychain import Keychain

PROG = "tosi-resolve"

DESCRIPTION = """\
Resolve IMAGE (e.g. alpine, user/img:tag, host:port/img@sha256:...) to one
platform's image manifest, store manifest and config bytes in the workdir, and
write the plan to stdout: one image record, then one record per layer.
With --no-cache, write nothing anywhere (an inspection, as skopeo inspect);
with --list-tags, print the tags of IMAGE's repository instead.
IMAGE may also name an image without a registry: oci:DIR[:TAG|@DIGEST] (an OCI
image layout) or docker-archive:FILE[:NAME:TAG] (a docker save tar, plain or
gzip); the path ends at the first ':'."""


def add_registry_flags(parser: argparse.ArgumentParser) -> None:
    """Credentials and transport flags shared by every command that talks to a registry."""
    add_credential_flags(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="use plain http (or skip certificate verification for https) "
                        "for a registry that is not on loopback")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="CA bundle to verify the registry's certificate (default: the "
                        "host's certs.d directory and the system CAs, or $REQUESTS_CA_BUNDLE)")


def keychain_from_args(args: argparse.Namespace) -> "Keychain":
    """The keychain (credentials and TLS per registry) of parsed registry flags."""
    from ..errors import UsageError
    from ..keychain import from_flags

    check_authfile(args.authfile)
    ca_file = None
    if args.ca_file:
        if not os.path.isfile(args.ca_file):
            raise UsageError(f"--ca-file {args.ca_file}: no such file")
        ca_file = os.path.abspath(args.ca_file)
    return from_flags(args.username, args.password, password_from_stdin(args), ca_file=ca_file,
                      insecure=args.insecure, authfile=args.authfile)


def _parser():
    epilog = "See tosi-resolve(1) and tosi-plan(5).\n\n" + exit_status_epilog(
        PROG, "the registry, network or cache failed")
    parser = new_parser(PROG, DESCRIPTION, epilog=epilog)
    add_workdir_flag(parser)
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="platform to pick from an index (default: this machine's)")
    parser.add_argument("--no-cache", action="store_true",
                        help="read and write no workdir (none is even made): every manifest "
                        "and the config come from the registry, and the plan names no cache "
                        "paths (tosi-fetch then fetches into its own workdir); --workdir is "
                        "not used")
    parser.add_argument("--list-tags", action="store_true",
                        help="print the tags of IMAGE's repository, one per line, instead of "
                        "a plan (IMAGE's tag or digest is ignored); writes no workdir")
    parser.add_argument("--page-size", type=count_type(1, 10_000), metavar="N",
                        help="with --list-tags: ask for N tags a page (the registry's n=; "
                        "default: the registry's own page)")
    add_registry_flags(parser)
    add_mirror_flag(parser)
    parser.add_argument("image", metavar="IMAGE",
                        help="image reference, oci:DIR[:TAG|@DIGEST] or docker-archive:FILE[:NAME:TAG] "
                        "(a repository with --list-tags)")
    return parser


def add_mirror_flag(parser: argparse.ArgumentParser) -> None:
    """--mirror URL, repeatable (tosi-resolve, tosi-fetch)."""
    parser.add_argument("--mirror", action="append", default=[], metavar="URL",
                        help="try this registry mirror or pull-through cache, [http(s)://]HOST[:PORT]"
                        "[/NAMESPACE], before the image's registry; repeat for more, tried in order; "
                        "replaces the mirrors registries.conf and daemon.json name")


def mirror_flags(values: Sequence[str], flag: str = "--mirror") -> list:
    """The parsed --mirror values (UsageError, exit 2, for a bad one)."""
    from ..mirrors import mirror_flag

    return [mirror_flag(value, flag) for value in values]


def _body(argv):
    args = _parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    if args.page_size and not args.list_tags:
        from ..errors import UsageError

        raise UsageError("--page-size goes with --list-tags")

    from ..plan import PlanWriter
    from ..imageplatform import parse_platform
    from ..reference import parse_any_reference, parse_reference
    from ..resolve import Resolver, resolve_image

    if args.list_tags:
        ref = parse_reference(args.image)
        resolver = Resolver(None, keychain=keychain_from_args(args))
        try:
            for tag in resolver.list_tags(ref, page_size=args.page_size):
                sys.stdout.write(tag + "\n")
        finally:
            if resolver.client is not None:
                resolver.client.close()
        sys.stdout.flush()
        return 0
    from ..registries import RegistryConfig

    mirrors = mirror_flags(args.mirror)
    parse_any_reference(args.image)  # a malformed reference is refused before any file is read
    platform = parse_platform(args.platform) if args.platform else None
    registries = RegistryConfig.load()
    image, layers = resolve_image(args.image, None if args.no_cache else args.workdir, platform=platform,
                                  keychain=keychain_from_args(args), registries=registries, mirrors=mirrors)
    PlanWriter(sys.stdout).write_plan(image, layers)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _body, argv)
