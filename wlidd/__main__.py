from wlidd.cli import main

raise SystemExit(main())
