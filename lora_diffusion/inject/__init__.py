"""Finding target modules by name and swapping them for adapted layers."""
