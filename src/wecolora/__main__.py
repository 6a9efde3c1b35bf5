from wecolora.cli import main

raise SystemExit(main())
