"""Sample data shipped inside the hsam package (``hsam sample``): the files and :mod:`.samples`, which hands them out
SHA-256 checked."""
