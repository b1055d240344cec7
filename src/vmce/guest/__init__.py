"""Guest loaders and images: our test guest and (later) stock Debian Linux."""
