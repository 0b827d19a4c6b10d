"""Images: a content-addressed layer store, Containerfile builds and OCI import/export.

``store`` keeps unpacked layers keyed by ChainID and image records that name them;
``tarlayer`` turns OCI layer tars into overlay-native directories and back;
``oci`` reads and writes image layouts and archives; ``containerfile`` parses
build files; ``build`` runs them with a Docker-style step cache.
"""
