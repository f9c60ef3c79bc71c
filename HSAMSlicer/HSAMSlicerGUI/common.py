"""What every section of the panel shares: the shared Resources folder."""


def resource(relative: str) -> str:
    """A file in the shared Resources folder (next to the module when installed; the repository root in a checkout)."""
    from hsam.paths import resources_dir

    return str(resources_dir() / relative)
