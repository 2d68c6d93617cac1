from pacs_classifier.cli import main

raise SystemExit(main())
