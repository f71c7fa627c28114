"""registries.conf, its drop-ins and Docker's daemon.json, as people have them:
which sources a reference is pulled from, and what a short name means.

Pure parsing: every file lives below a temporary root given to RegistryConfig.load,
and no test talks to a registry (the transport that uses the answers is tested
with real registries where it is wired in)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tosi_tools.errors import AmbiguousShortName, BlockedReference, ConfigError, InvalidReference
from tosi_tools.reference import parse_reference
from tosi_tools.registries import MAX_CONFIG_BYTES, RegistryConfig

DIGEST = "sha256:" + "c" * 64

CONF = "etc/containers/registries.conf"
CONF_D = "etc/containers/registries.conf.d"
DAEMON_JSON = "etc/docker/daemon.json"
ALIASES_CONF = "var/cache/containers/short-name-aliases.conf"


def load(root, files=None, environ=None, euid=0):
    """Write `files` ({path below root: text}) and load the configuration from root."""
    for relative, text in (files or {}).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return RegistryConfig.load(root=str(root), environ=environ or {}, euid=euid)


def tried(config, text):
    """The references a pull of `text` asks, in order, each as fully qualified text."""
    return [str(source.reference) for source in config.lookup(parse_reference(text)).to_try]


def short(config, text):
    return [str(ref) for ref in config.resolve_short_name(text)]


# --- Nothing configured: the original tool's behaviour --------------------------------------


@pytest.mark.parametrize("text", ["alpine", "alpine:3.19", "user/img:v1", f"img@{DIGEST}",
                                  "localhost:5000/a/img:tag", "quay.io/team/app"])
def test_without_configuration_a_name_resolves_as_parse_reference_does(tmp_path, text):
    config = load(tmp_path)
    assert config.resolve_short_name(text) == [parse_reference(text)]


def test_without_configuration_a_pull_has_one_source_its_own_registry(tmp_path):
    reference = parse_reference("alpine:3.19")
    pull = load(tmp_path).lookup(reference)
    assert [(s.reference, s.mirror, s.used, s.insecure, s.scheme) for s in pull.sources] == \
        [(reference, False, True, False, None)]
    assert (pull.prefix, pull.origin.registry, pull.origin.repository) == (None, "docker.io", "library/alpine")


def test_a_config_made_with_no_arguments_configures_nothing():
    config = RegistryConfig()
    assert short(config, "alpine") == ["docker.io/library/alpine:latest"]
    assert tried(config, "quay.io/a/b:1") == ["quay.io/a/b:1"]


def test_debian_shipped_file_of_comments_only_configures_nothing(tmp_path):
    config = load(tmp_path, {CONF: """\
        # For more information on this configuration file, see containers-registries.conf(5).
        #
        # unqualified-search-registries = ["example.com"]
        # [[registry]]
        # prefix = "example.com/foo"
        # location = "internal-registry-for-example.com/bar"
        """})
    assert short(config, "alpine") == ["docker.io/library/alpine:latest"]
    assert tried(config, "alpine") == ["docker.io/library/alpine:latest"]
    assert config.files == (str(tmp_path / CONF),)


def test_loading_nothing_does_not_import_tomllib(tmp_path):
    code = ("import sys; from tosi_tools.registries import RegistryConfig; "
            f"RegistryConfig.load(root={str(tmp_path)!r}, environ={{}}); print('tomllib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- Distribution defaults: Fedora, RHEL ------------------------------------------------------


FEDORA = {
    CONF: """\
        unqualified-search-registries = ["registry.fedoraproject.org", "registry.access.redhat.com", "docker.io"]
        short-name-mode = "enforcing"
        """,
    f"{CONF_D}/000-shortnames.conf": """\
        [aliases]
          # centos
          "centos" = "quay.io/centos/centos"
          # fedora
          "fedora" = "registry.fedoraproject.org/fedora"
          # docker
          "alpine" = "docker.io/library/alpine"
          "busybox" = "docker.io/busybox"
          "docker" = "docker.io/library/docker"
        """,
}


@pytest.mark.parametrize("name, candidates", [
    ("fedora:40", ["registry.fedoraproject.org/fedora:40"]),
    ("alpine", ["docker.io/library/alpine:latest"]),
    ("busybox", ["docker.io/library/busybox:latest"]),
    (f"centos@{DIGEST}", [f"quay.io/centos/centos@{DIGEST}"]),
    ("centos:stream9@" + DIGEST, [f"quay.io/centos/centos:stream9@{DIGEST}"]),
    ("registry.fedoraproject.org/fedora-minimal", ["registry.fedoraproject.org/fedora-minimal:latest"]),
])
def test_fedora_aliases_resolve_short_names_keeping_tag_and_digest(tmp_path, name, candidates):
    assert short(load(tmp_path, FEDORA), name) == candidates


def test_fedora_enforcing_mode_refuses_an_unaliased_short_name_naming_the_choices(tmp_path):
    with pytest.raises(AmbiguousShortName) as caught:
        load(tmp_path, FEDORA).resolve_short_name("someimage:1")
    message = str(caught.value)
    assert "'someimage'" in message and "enforcing" in message
    assert "registry.fedoraproject.org, registry.access.redhat.com, docker.io" in message
    assert str(tmp_path / CONF) in message
    assert caught.value.exit_code == 2 and isinstance(caught.value, InvalidReference)


def test_rhel_permissive_mode_tries_every_search_registry_in_order(tmp_path):
    config = load(tmp_path, {CONF: """\
        unqualified-search-registries = ["registry.access.redhat.com", "registry.redhat.io", "docker.io"]
        short-name-mode = "permissive"
        """})
    assert short(config, "ubi9/ubi-minimal:9.4") == [
        "registry.access.redhat.com/ubi9/ubi-minimal:9.4",
        "registry.redhat.io/ubi9/ubi-minimal:9.4",
        "docker.io/ubi9/ubi-minimal:9.4",
    ]
    assert short(config, "nginx") == ["registry.access.redhat.com/nginx:latest",
                                      "registry.redhat.io/nginx:latest", "docker.io/library/nginx:latest"]


def test_short_name_mode_defaults_to_permissive(tmp_path):
    config = load(tmp_path, {CONF: 'unqualified-search-registries = ["quay.io", "docker.io"]\n'})
    assert config.short_name_mode == "permissive"
    assert short(config, "app") == ["quay.io/app:latest", "docker.io/library/app:latest"]


def test_enforcing_mode_with_one_search_registry_is_not_ambiguous(tmp_path):
    config = load(tmp_path, {CONF: 'unqualified-search-registries = ["quay.io"]\nshort-name-mode = "enforcing"\n'})
    assert short(config, "team/app:2") == ["quay.io/team/app:2"]


def test_an_empty_search_list_leaves_docker_io_the_default(tmp_path):
    config = load(tmp_path, {CONF: "unqualified-search-registries = []\n"})
    assert short(config, "alpine") == ["docker.io/library/alpine:latest"]


# --- A company's mirrors ----------------------------------------------------------------------


COMPANY = {CONF: """\
    unqualified-search-registries = ["docker.io"]

    [[registry]]
    prefix = "docker.io"
    location = "docker.io"

    [[registry.mirror]]
    location = "harbor.corp.example/dockerhub-proxy"

    [[registry.mirror]]
    location = "10.0.0.5:5000"
    insecure = true

    [[registry]]
    location = "quay.io"
    mirror-by-digest-only = true

    [[registry.mirror]]
    location = "harbor.corp.example/quay-proxy"
    """}


def test_company_mirrors_come_first_in_order_then_the_origin(tmp_path):
    pull = load(tmp_path, COMPANY).lookup(parse_reference("alpine:3.19"))
    assert [(str(s.reference), s.mirror, s.insecure) for s in pull.to_try] == [
        ("harbor.corp.example/dockerhub-proxy/library/alpine:3.19", True, False),
        ("10.0.0.5:5000/library/alpine:3.19", True, True),
        ("docker.io/library/alpine:3.19", False, False),
    ]
    assert pull.prefix == "docker.io" and pull.path == str(tmp_path / CONF)
    assert [(s.registry, s.repository) for s in pull.to_try][:2] == [
        ("harbor.corp.example", "dockerhub-proxy/library/alpine"), ("10.0.0.5:5000", "library/alpine")]


def test_a_prefix_defaults_to_the_location(tmp_path):
    assert load(tmp_path, COMPANY).lookup(parse_reference("quay.io/a/b@" + DIGEST)).prefix == "quay.io"


def test_mirror_by_digest_only_skips_the_mirror_for_a_tag_and_says_why(tmp_path):
    pull = load(tmp_path, COMPANY).lookup(parse_reference("quay.io/team/app:1"))
    mirror, origin = pull.sources
    assert (str(mirror.reference), mirror.used) == ("harbor.corp.example/quay-proxy/team/app:1", False)
    assert "mirror-by-digest-only" in mirror.skip_reason
    assert [str(s.reference) for s in pull.to_try] == ["quay.io/team/app:1"]


def test_mirror_by_digest_only_uses_the_mirror_for_a_digest(tmp_path):
    assert tried(load(tmp_path, COMPANY), f"quay.io/team/app:1@{DIGEST}") == [
        f"harbor.corp.example/quay-proxy/team/app:1@{DIGEST}", f"quay.io/team/app:1@{DIGEST}"]


PULL_FROM_MIRROR = {CONF: """\
    [[registry]]
    prefix = "registry.example.com"
    location = "registry.example.com"

    [[registry.mirror]]
    location = "digests.mirror.example"
    pull-from-mirror = "digest-only"

    [[registry.mirror]]
    location = "tags.mirror.example"
    pull-from-mirror = "tag-only"

    [[registry.mirror]]
    location = "all.mirror.example"
    pull-from-mirror = "all"
    """}


@pytest.mark.parametrize("text, expected", [
    ("registry.example.com/app:1", ["tags.mirror.example/app:1", "all.mirror.example/app:1",
                                    "registry.example.com/app:1"]),
    (f"registry.example.com/app@{DIGEST}", [f"digests.mirror.example/app@{DIGEST}",
                                            f"all.mirror.example/app@{DIGEST}",
                                            f"registry.example.com/app@{DIGEST}"]),
])
def test_pull_from_mirror_picks_mirrors_by_tag_or_digest(tmp_path, text, expected):
    assert tried(load(tmp_path, PULL_FROM_MIRROR), text) == expected


def test_pull_from_mirror_lists_the_skipped_mirror_with_its_reason(tmp_path):
    pull = load(tmp_path, PULL_FROM_MIRROR).lookup(parse_reference(f"registry.example.com/app@{DIGEST}"))
    skipped = [s for s in pull.sources if not s.used]
    assert [(s.registry, s.skip_reason) for s in skipped] == [
        ("tags.mirror.example", "pull-from-mirror is tag-only, and the reference names a digest")]


# --- Location rewriting and prefix matching ----------------------------------------------------


MAN_PAGE_EXAMPLE = {CONF: """\
    unqualified-search-registries = ["example.com"]

    [[registry]]
    prefix = "example.com/foo"
    insecure = false
    blocked = false
    location = "internal-registry-for-example.com/bar"

    [[registry.mirror]]
    location = "example-mirror-0.local/mirror-for-foo"

    [[registry.mirror]]
    location = "example-mirror-1.local/mirrors/foo"
    insecure = true
    """}


def test_man_page_example_rewrites_mirrors_and_location(tmp_path):
    pull = load(tmp_path, MAN_PAGE_EXAMPLE).lookup(parse_reference("example.com/foo/image:latest"))
    assert [(str(s.reference), s.insecure) for s in pull.to_try] == [
        ("example-mirror-0.local/mirror-for-foo/image:latest", False),
        ("example-mirror-1.local/mirrors/foo/image:latest", True),
        ("internal-registry-for-example.com/bar/image:latest", False),
    ]
    assert pull.reference == parse_reference("example.com/foo/image:latest")


@pytest.mark.parametrize("text", ["example.com/foobar/image", "example.com/image", "example.com:5000/foo/image"])
def test_a_prefix_matches_only_at_a_component_boundary(tmp_path, text):
    assert tried(load(tmp_path, MAN_PAGE_EXAMPLE), text) == [str(parse_reference(text))]


def test_a_short_name_searches_then_gets_rewritten_by_lookup(tmp_path):
    config = load(tmp_path, MAN_PAGE_EXAMPLE)
    [candidate] = config.resolve_short_name("foo/image:2")
    assert str(candidate) == "example.com/foo/image:2"
    assert tried(config, str(candidate))[-1] == "internal-registry-for-example.com/bar/image:2"


def test_the_longest_matching_prefix_wins(tmp_path):
    config = load(tmp_path, {CONF: """\
        [[registry]]
        prefix = "docker.io"
        location = "hub-cache.corp.example"

        [[registry]]
        prefix = "docker.io/library"
        location = "official.corp.example/library"

        [[registry]]
        prefix = "docker.io/library/alpine:3.19"
        location = "pinned.corp.example/alpine:3.19-patched"
        """})
    assert tried(config, "user/app") == ["hub-cache.corp.example/user/app:latest"]
    assert tried(config, "busybox") == ["official.corp.example/library/busybox:latest"]
    assert tried(config, "alpine:3.19") == ["pinned.corp.example/alpine:3.19-patched"]
    assert tried(config, "alpine:3.20") == ["official.corp.example/library/alpine:3.20"]


def test_a_prefix_with_a_digest_matches_only_that_digest(tmp_path):
    config = load(tmp_path, {CONF: f"""\
        [[registry]]
        prefix = "quay.io/team/app@{DIGEST}"
        location = "vault.corp.example/app@{DIGEST}"
        """})
    assert tried(config, f"quay.io/team/app@{DIGEST}") == [f"vault.corp.example/app@{DIGEST}"]
    assert tried(config, "quay.io/team/app:1") == ["quay.io/team/app:1"]


def test_a_location_that_makes_an_invalid_reference_is_a_config_error_naming_the_file(tmp_path):
    config = load(tmp_path, {CONF: """\
        [[registry]]
        prefix = "quay.io/team"
        location = "cache.corp.example/team:v1"
        """})
    with pytest.raises(ConfigError) as caught:
        config.lookup(parse_reference("quay.io/team/app"))
    assert str(tmp_path / CONF) in str(caught.value) and "cache.corp.example/team:v1/app" in str(caught.value)


WILDCARD = {CONF: """\
    [[registry]]
    prefix = "*.example.com"
    [[registry.mirror]]
    location = "cache.corp.example/example"

    [[registry]]
    prefix = "*.internal.example.com"
    insecure = true

    [[registry]]
    prefix = "legacy.example.com"
    location = "legacy.example.com"
    blocked = true
    """}


@pytest.mark.parametrize("text, expected", [
    ("foo.example.com/team/app:1", ["cache.corp.example/example/team/app:1", "foo.example.com/team/app:1"]),
    ("a.b.example.com/app", ["cache.corp.example/example/app:latest", "a.b.example.com/app:latest"]),
    ("example.com/app", ["example.com/app:latest"]),
    ("badexample.com/app", ["badexample.com/app:latest"]),
    ("foo.example.com.evil.net/app", ["foo.example.com.evil.net/app:latest"]),
    ("db.internal.example.com/pg:16", ["db.internal.example.com/pg:16"]),
])
def test_a_wildcard_prefix_matches_hosts_below_the_domain(tmp_path, text, expected):
    assert tried(load(tmp_path, WILDCARD), text) == expected


def test_a_wildcard_prefix_keeps_the_reference_as_its_origin_with_its_settings(tmp_path):
    pull = load(tmp_path, WILDCARD).lookup(parse_reference("db.internal.example.com:5000/pg"))
    assert pull.prefix == "*.internal.example.com"
    assert [(str(s.reference), s.insecure) for s in pull.to_try] == [("db.internal.example.com:5000/pg:latest", True)]


def test_an_exact_host_prefix_wins_over_a_wildcard(tmp_path):
    with pytest.raises(BlockedReference):
        load(tmp_path, WILDCARD).lookup(parse_reference("legacy.example.com/app"))


# --- Blocked -----------------------------------------------------------------------------------


BLOCKED = {CONF: """\
    [[registry]]
    location = "registry.untrusted.example"
    blocked = true

    [[registry]]
    prefix = "docker.io/library/evil"
    location = "docker.io/library/evil"
    blocked = true
    """}


@pytest.mark.parametrize("text", ["registry.untrusted.example/app:1", "evil", f"evil@{DIGEST}",
                                  "docker.io/library/evil/sub"])
def test_a_blocked_prefix_refuses_the_pull_naming_prefix_and_file(tmp_path, text):
    with pytest.raises(BlockedReference) as caught:
        load(tmp_path, BLOCKED).lookup(parse_reference(text))
    assert caught.value.exit_code == 2
    assert caught.value.path == str(tmp_path / CONF) and caught.value.prefix in str(caught.value)
    assert "blocked" in str(caught.value)


@pytest.mark.parametrize("text", ["evilution", "registry.untrusted.example.net/app", "someone/evil"])
def test_a_blocked_prefix_leaves_other_names_alone(tmp_path, text):
    assert tried(load(tmp_path, BLOCKED), text) == [str(parse_reference(text))]


# --- Drop-ins: registries.conf.d -------------------------------------------------------------


DROP_INS = {
    CONF: """\
        unqualified-search-registries = ["quay.io"]
        short-name-mode = "enforcing"

        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "old-mirror.example"

        [[registry]]
        location = "quay.io"
        [[registry.mirror]]
        location = "quay-mirror.example"

        [aliases]
        "app" = "quay.io/team/app"
        "tool" = "quay.io/team/tool"
        """,
    f"{CONF_D}/10-mirror.conf": """\
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "new-mirror.example"
        """,
    f"{CONF_D}/20-search.conf": """\
        unqualified-search-registries = ["registry.example.com", "docker.io"]
        short-name-mode = "permissive"

        [aliases]
        "app" = "registry.example.com/app"
        "tool" = ""
        """,
    f"{CONF_D}/05-first.conf": """\
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "superseded-mirror.example"
        """,
    f"{CONF_D}/99-disabled.conf.rpmsave": "this is not even TOML\n",
}


def test_a_later_drop_in_replaces_the_registry_of_its_prefix_whole(tmp_path):
    config = load(tmp_path, DROP_INS)
    assert tried(config, "alpine") == ["new-mirror.example/library/alpine:latest", "docker.io/library/alpine:latest"]
    assert tried(config, "quay.io/a/b") == ["quay-mirror.example/a/b:latest", "quay.io/a/b:latest"]


def test_drop_ins_are_read_in_name_order_after_the_main_file_and_only_conf(tmp_path):
    (tmp_path / CONF_D / "50-directory.conf").mkdir(parents=True)
    config = load(tmp_path, DROP_INS)
    names = [os.path.relpath(path, tmp_path) for path in config.files]
    assert names == [CONF, f"{CONF_D}/05-first.conf", f"{CONF_D}/10-mirror.conf", f"{CONF_D}/20-search.conf"]


def test_a_drop_in_replaces_the_search_list_and_mode_and_merges_aliases(tmp_path):
    config = load(tmp_path, DROP_INS)
    assert config.search_registries == ("registry.example.com", "docker.io")
    assert config.search_path == str(tmp_path / CONF_D / "20-search.conf")
    assert short(config, "app:2") == ["registry.example.com/app:2"]
    # "" erases the alias, so the (now permissive) search list applies.
    assert short(config, "tool") == ["registry.example.com/tool:latest", "docker.io/library/tool:latest"]


def test_a_drop_in_that_does_not_set_the_search_list_keeps_it(tmp_path):
    config = load(tmp_path, {CONF: 'unqualified-search-registries = ["quay.io"]\n',
                             f"{CONF_D}/10-other.conf": '[[registry]]\nlocation = "x.example"\n'})
    assert config.search_registries == ("quay.io",)


def test_a_drop_in_in_version_1_format_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {f"{CONF_D}/10-old.conf": '[registries.search]\nregistries = ["quay.io"]\n'})
    assert str(tmp_path / CONF_D / "10-old.conf") in str(caught.value)


def test_short_name_aliases_conf_wins_over_registries_conf(tmp_path):
    config = load(tmp_path, {**FEDORA, ALIASES_CONF: '[aliases]\n"alpine" = "quay.io/mirrors/alpine"\n'})
    assert short(config, "alpine:3") == ["quay.io/mirrors/alpine:3"]
    assert short(config, "fedora") == ["registry.fedoraproject.org/fedora:latest"]


def test_a_user_short_name_aliases_conf_is_under_the_xdg_cache(tmp_path):
    files = {**FEDORA, "cache/containers/short-name-aliases.conf": '[aliases]\n"alpine" = "quay.io/a/alpine"\n'}
    config = load(tmp_path, files, environ={"XDG_CACHE_HOME": str(tmp_path / "cache")}, euid=1000)
    assert short(config, "alpine") == ["quay.io/a/alpine:latest"]


# --- Which files: environment and home -------------------------------------------------------


def test_containers_registries_conf_replaces_the_main_file_and_keeps_drop_ins(tmp_path):
    files = {CONF: 'unqualified-search-registries = ["ignored.example"]\n',
             "elsewhere.conf": 'unqualified-search-registries = ["quay.io"]\n',
             f"{CONF_D}/10.conf": '[aliases]\n"app" = "quay.io/team/app"\n'}
    config = load(tmp_path, files, environ={"CONTAINERS_REGISTRIES_CONF": str(tmp_path / "elsewhere.conf")})
    assert config.search_registries == ("quay.io",)
    assert short(config, "app") == ["quay.io/team/app:latest"]


def test_containers_registries_conf_naming_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path, environ={"CONTAINERS_REGISTRIES_CONF": str(tmp_path / "missing.conf")})


def test_tosi_registries_conf_is_the_only_containers_file_read(tmp_path):
    files = {**FEDORA, ALIASES_CONF: '[aliases]\n"alpine" = "quay.io/a/alpine"\n',
             "test.conf": '[[registry]]\nlocation = "quay.io"\n[[registry.mirror]]\nlocation = "m.example"\n'}
    config = load(tmp_path, files, environ={"TOSI_REGISTRIES_CONF": str(tmp_path / "test.conf")})
    assert config.files == (str(tmp_path / "test.conf"),)
    assert short(config, "alpine") == ["docker.io/library/alpine:latest"]
    assert tried(config, "quay.io/a/b") == ["m.example/a/b:latest", "quay.io/a/b:latest"]


def test_an_empty_tosi_registries_conf_reads_no_containers_file(tmp_path):
    config = load(tmp_path, FEDORA, environ={"TOSI_REGISTRIES_CONF": ""})
    assert config.files == ()
    assert short(config, "someimage") == ["docker.io/library/someimage:latest"]


def test_the_users_registries_conf_replaces_the_system_one(tmp_path):
    files = {**FEDORA, "home/.config/containers/registries.conf": 'unqualified-search-registries = ["quay.io"]\n',
             "home/.config/containers/registries.conf.d/1.conf": '[aliases]\n"x" = "quay.io/team/x"\n'}
    config = load(tmp_path, files, environ={"HOME": str(tmp_path / "home")})
    assert short(config, "someimage") == ["quay.io/someimage:latest"]
    assert short(config, "x") == ["quay.io/team/x:latest"]
    assert short(config, "alpine") == ["quay.io/alpine:latest"]  # the system drop-in is not read


def test_the_users_drop_ins_come_after_the_system_ones(tmp_path):
    files = {**FEDORA, "home/.config/containers/registries.conf.d/1.conf": '[aliases]\n"alpine" = "quay.io/x/alpine"\n'}
    config = load(tmp_path, files, environ={"HOME": str(tmp_path / "home")})
    assert short(config, "alpine") == ["quay.io/x/alpine:latest"]


# --- Version 1 format --------------------------------------------------------------------------


def test_version_1_lists_become_search_insecure_and_blocked(tmp_path):
    config = load(tmp_path, {CONF: """\
        [registries.search]
        registries = ['registry1.example', 'registry2.example']

        [registries.insecure]
        registries = ['registry3.example:5000']

        [registries.block]
        registries = ['registry.untrusted.example']
        """})
    assert short(config, "app") == ["registry1.example/app:latest", "registry2.example/app:latest"]
    assert [s.insecure for s in config.lookup(parse_reference("registry3.example:5000/app")).to_try] == [True]
    with pytest.raises(BlockedReference):
        config.lookup(parse_reference("registry.untrusted.example/app"))


# --- Docker's daemon.json ------------------------------------------------------------------------


DAEMON = {DAEMON_JSON: """\
    {
      "registry-mirrors": ["https://mirror.gcr.io", "http://10.1.2.3:5000/"],
      "insecure-registries": ["registry.lab.example:5000", "192.168.0.0/16"],
      "log-driver": "json-file"
    }
    """}


def test_daemon_json_mirrors_serve_docker_io_before_the_origin(tmp_path):
    pull = load(tmp_path, DAEMON).lookup(parse_reference("alpine:3.19"))
    assert [(str(s.reference), s.mirror, s.scheme, s.insecure) for s in pull.to_try] == [
        ("mirror.gcr.io/library/alpine:3.19", True, "https", False),
        ("10.1.2.3:5000/library/alpine:3.19", True, "http", True),
        ("docker.io/library/alpine:3.19", False, None, False),
    ]
    assert pull.sources[0].path == str(tmp_path / DAEMON_JSON)


def test_daemon_json_mirrors_do_not_serve_other_registries(tmp_path):
    assert tried(load(tmp_path, DAEMON), "quay.io/a/b") == ["quay.io/a/b:latest"]


@pytest.mark.parametrize("text, insecure", [
    ("registry.lab.example:5000/app", True),
    ("registry.lab.example/app", False),
    ("192.168.7.8:5000/app", True),
    ("10.0.0.1/app", False),
])
def test_daemon_json_insecure_registries_mark_matching_hosts(tmp_path, text, insecure):
    [source] = load(tmp_path, DAEMON).lookup(parse_reference(text)).to_try
    assert source.insecure is insecure


def test_registries_conf_for_docker_io_takes_precedence_over_daemon_json_mirrors(tmp_path):
    config = load(tmp_path, {**DAEMON, **COMPANY})
    assert tried(config, "alpine")[0] == "harbor.corp.example/dockerhub-proxy/library/alpine:latest"
    assert len(tried(config, "alpine")) == 3


def test_tosi_docker_daemon_json_names_another_file_or_none(tmp_path):
    files = {**DAEMON, "test-daemon.json": '{"registry-mirrors": ["https://cache.test:5443"]}'}
    config = load(tmp_path, files, environ={"TOSI_DOCKER_DAEMON_JSON": str(tmp_path / "test-daemon.json")})
    assert tried(config, "alpine")[0] == "cache.test:5443/library/alpine:latest"
    assert len(tried(load(tmp_path, DAEMON, environ={"TOSI_DOCKER_DAEMON_JSON": ""}), "alpine")) == 1


# --- Malformed and hostile files -------------------------------------------------------------


MALFORMED_CONF = [
    ("invalid TOML", "[[registry]\nlocation = 'x.example'\n", "malformed TOML"),
    ("wrong type", '[[registry]]\nlocation = "x.example"\ninsecure = "yes"\n', "insecure must be true or false"),
    ("registry not an array", '[registry]\nlocation = "x.example"\n', "array of tables"),
    ("search not strings", "unqualified-search-registries = [1, 2]\n", "array of strings"),
    ("search entry no host", 'unqualified-search-registries = ["myregistry"]\n', "'myregistry'"),
    ("search entry with path", 'unqualified-search-registries = ["quay.io/team"]\n', "quay.io/team"),
    ("neither prefix nor location", "[[registry]]\ninsecure = true\n", "neither prefix nor location"),
    ("no location, plain prefix", '[[registry]]\nprefix = "x.example"\n', "wildcard"),
    ("location with scheme", '[[registry]]\nlocation = "https://x.example"\n', "scheme"),
    ("location without host", '[[registry]]\nlocation = "team/app"\n', "registry host"),
    ("location bad path", '[[registry]]\nlocation = "x.example/Bad Path"\n', "valid name"),
    ("wildcard with port", '[[registry]]\nprefix = "*.example.com:5000"\n', "*.example.com"),
    ("wildcard with namespace", '[[registry]]\nprefix = "*.example.com/team"\n', "*.example.com"),
    ("wildcard in the middle", '[[registry]]\nprefix = "registry.*.example.com"\nlocation = "x.example"\n',
     "wildcard may only start"),
    ("mirror without location", '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\ninsecure = true\n',
     "has no location"),
    ("bad pull-from-mirror", '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\n'
     'location = "m.example"\npull-from-mirror = "sometimes"\n', "pull-from-mirror must be one of"),
    ("pull-from-mirror with digest-only registry", '[[registry]]\nlocation = "x.example"\n'
     'mirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m.example"\npull-from-mirror = "all"\n',
     "mirror-by-digest-only"),
    ("pull-from-mirror on the registry", '[[registry]]\nlocation = "x.example"\npull-from-mirror = "all"\n',
     "[[registry.mirror]]"),
    ("conflicting insecure", '[[registry]]\nprefix = "a.example"\nlocation = "x.example"\ninsecure = true\n'
     '[[registry]]\nprefix = "b.example"\nlocation = "x.example"\n', "conflicting insecure"),
    ("bad short-name-mode", 'short-name-mode = "strict"\n', "short-name-mode must be one of"),
    ("alias with tag", '[aliases]\n"app" = "quay.io/team/app:1"\n', "no tag or digest"),
    ("alias name with registry", '[aliases]\n"quay.io/app" = "quay.io/team/app"\n', "short name"),
    ("alias name with tag", '[aliases]\n"app:1" = "quay.io/team/app"\n', "no tag or digest"),
    ("alias value short", '[aliases]\n"app" = "team/app"\n', "fully qualified"),
    ("alias value not a string", '[aliases]\n"app" = 3\n', "must be a string"),
    ("mixed v1 and v2", '[registries.search]\nregistries = ["quay.io"]\n[[registry]]\nlocation = "x.example"\n',
     "mixes"),
]


@pytest.mark.parametrize("text, fragment", [case[1:] for case in MALFORMED_CONF],
                         ids=[case[0] for case in MALFORMED_CONF])
def test_a_malformed_registries_conf_is_one_config_error_naming_the_file(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {CONF: text})
    assert str(tmp_path / CONF) in str(caught.value)
    assert fragment in str(caught.value)
    assert caught.value.path == str(tmp_path / CONF) and caught.value.exit_code == 2


MALFORMED_DAEMON_JSON = [
    ("not JSON", '{"registry-mirrors": [', "malformed JSON"),
    ("not an object", '["https://mirror.gcr.io"]', "JSON object"),
    ("mirrors not strings", '{"registry-mirrors": [{"url": "https://m"}]}', "array of strings"),
    ("mirror without scheme", '{"registry-mirrors": ["mirror.gcr.io"]}', "http(s)://"),
    ("mirror with credentials", '{"registry-mirrors": ["https://u:p@mirror.example"]}', "no user"),
    ("mirror below a path", '{"registry-mirrors": ["https://mirror.example/proxy"]}', "path"),
    ("mirror bad port", '{"registry-mirrors": ["https://mirror.example:99999"]}', "HOST[:PORT]"),
    ("insecure entry bad", '{"insecure-registries": ["not a host"]}', "neither HOST[:PORT] nor a CIDR"),
    ("insecure CIDR bad", '{"insecure-registries": ["10.0.0.0/99"]}', "neither HOST[:PORT] nor a CIDR"),
]


@pytest.mark.parametrize("text, fragment", [case[1:] for case in MALFORMED_DAEMON_JSON],
                         ids=[case[0] for case in MALFORMED_DAEMON_JSON])
def test_a_malformed_daemon_json_is_one_config_error_naming_the_file(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {DAEMON_JSON: text})
    assert str(tmp_path / DAEMON_JSON) in str(caught.value) and fragment in str(caught.value)


@pytest.mark.parametrize("url", ["https://user:s3cret@mirror.example", "user:s3cret@mirror.example",
                                 "https://user:s3cret@mirror.example//a@b/path"])
def test_a_mirror_url_with_a_password_is_refused_without_repeating_the_password(tmp_path, url):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {DAEMON_JSON: json.dumps({"registry-mirrors": [url]})})
    assert "registry-mirrors" in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "etc/containers").mkdir(parents=True)
    (tmp_path / CONF).write_bytes(b'unqualified-search-registries = ["\xff"]\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(tmp_path)


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path):
    (tmp_path / "etc/containers").mkdir(parents=True)
    (tmp_path / CONF).write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load(tmp_path)


def test_deeply_nested_toml_is_a_config_error_not_a_recursion_traceback(tmp_path):
    depth = 200_000
    with pytest.raises(ConfigError, match="malformed TOML"):
        load(tmp_path, {CONF: "x = " + "[" * depth + "]" * depth + "\n"})


def test_a_directory_where_the_file_belongs_is_a_config_error(tmp_path):
    (tmp_path / CONF).mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path)


def test_a_fifo_where_the_file_belongs_is_refused_without_blocking(tmp_path):
    (tmp_path / "etc/containers").mkdir(parents=True)
    os.mkfifo(tmp_path / CONF)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path)


def test_an_unreadable_file_is_a_config_error(tmp_path):
    conf = tmp_path / "unreadable.conf"
    conf.write_text('unqualified-search-registries = ["quay.io"]\n')
    conf.chmod(0)
    env = {"TOSI_REGISTRIES_CONF": str(conf)}
    code = ("from tosi_tools.registries import RegistryConfig; from tosi_tools.errors import ConfigError\n"
            f"try: RegistryConfig.load(environ={env!r})\nexcept ConfigError as exc: print(exc)")
    # uid 65534: root reads a mode-0 file anyway.
    tmp_path.chmod(0o755)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "cannot read configuration file" in out.stdout and str(conf) in out.stdout, out.stderr


def test_the_error_of_a_later_drop_in_names_that_drop_in(tmp_path):
    files = {**FEDORA, f"{CONF_D}/50-broken.conf": "[aliases]\n'app' = 'quay.io/x/app:1'\n"}
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, files)
    assert str(tmp_path / CONF_D / "50-broken.conf") in str(caught.value)
    assert "'app'" in str(caught.value)


def test_a_hostile_value_is_quoted_short_in_the_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {CONF: f'short-name-mode = "{"x" * 5000}"\n'})
    assert len(str(caught.value)) < 400
