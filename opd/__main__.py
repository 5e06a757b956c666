from opd.cli import main

raise SystemExit(main())
