from parameternet.cli import main

raise SystemExit(main())
